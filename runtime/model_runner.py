"""ModelRunner: owns the model, the KV tensors, input preparation and the sampler.

It never decides what to run: it executes a SchedulerOutput. Per-request state lives in a persistent
batch (a row of a preallocated block table per request) so a decode step costs O(batch) numpy work, not a
rebuild of every block table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.runtime.config import CacheConfig, SchedulerConfig
from pagedserve.runtime.layers import AttentionMetadata
from pagedserve.runtime.models import get_model_class
from pagedserve.runtime.parallel import SINGLE, TPGroup
from pagedserve.runtime.rejection_sampler import VerifiedTokens, verify_drafts
from pagedserve.runtime.sampler import (
    Sampler,
    SamplingRow,
    compute_logprobs,
    staging_scope,
    suppressed_token_ids,
)
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.scheduler import SchedulerOutput
from pagedserve.runtime.staging import HostStaging
from pagedserve.runtime.structured_outputs import GrammarCompiler, GrammarMatcher

logger = logging.getLogger("pagedserve.runner")


@dataclass
class RequestState:
    row: int
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]
    num_blocks: int = 0
    prompt_logprobs: list = field(default_factory=list)
    sampling_row: SamplingRow | None = None  # built once; it sees output_token_ids grow
    num_draft_computed: int = 0  # verified tokens whose KV the draft model has computed (draft_model method)
    grammar: GrammarMatcher | None = None  # structured outputs, on the sampling rank (built on first use)

    def row_for_sampling(self, grammars: GrammarCompiler | None = None) -> SamplingRow:
        row = self.sampling_row
        if row is None:
            row = self.sampling_row = SamplingRow(
                self.params, self.generator, self.prompt_token_ids, self.output_token_ids, []
            )
        p = self.params
        if p.min_tokens:
            # EOS and stop ids are masked until min_tokens outputs exist.
            suppressed = suppressed_token_ids(p, len(self.output_token_ids), self.eos_token_ids)
            if suppressed != row.suppressed_token_ids:
                row.suppressed_token_ids = suppressed
                row.process = bool(suppressed) or p.needs_logit_processing
        if p.structured_outputs is not None:  # its mask comes from ModelRunner._rows (all rows' at once)
            if self.grammar is None:
                if grammars is None:
                    raise RuntimeError("a request has structured_outputs but this runner has no grammar compiler")
                self.grammar = grammars.matcher(p.structured_outputs)
            self.grammar.advance(self.output_token_ids)
            row.process = True
        return row


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: list[int]  # aligned with SchedulerOutput.req_ids; -1 where nothing was sampled
    logprobs: list | None
    prompt_logprobs: dict[str, list] | None
    # Speculative decoding: per batch index of a request that had drafts, the tokens its verification produced.
    verified: dict[int, VerifiedTokens] | None = None


class DeferredOutput:
    """A step's sampled tokens still on their way from the device (async scheduling): a non-blocking copy
    into pinned memory and an event; ``get()`` waits for that event only, never for later steps."""

    def __init__(self, device_ids: torch.Tensor, sample_idx: list[int], states: list, num_reqs: int) -> None:
        self.sample_idx = sample_idx
        self.states = states
        self.num_reqs = num_reqs
        self.event = None
        if device_ids.device.type == "cuda":
            self.host = torch.empty(device_ids.shape, dtype=device_ids.dtype, pin_memory=True)
            self.host.copy_(device_ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = device_ids

    def get(self) -> ModelRunnerOutput:
        if self.event is not None:
            self.event.synchronize()
        ids = self.host.tolist()
        sampled = [-1] * self.num_reqs
        states = self.states
        for j, i in enumerate(self.sample_idx):
            sampled[i] = ids[j]
            states[i].output_token_ids.append(ids[j])
        return ModelRunnerOutput(sampled, None, None)


def kv_bytes_per_token(hf_config, dtype: torch.dtype, tp: TPGroup) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    kv_heads_per_rank = max(1, kv_heads // tp.size)
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * kv_heads_per_rank * head_dim * elem


def warm_up_cases(max_num_batched_tokens: int, max_model_len: int) -> list[tuple[int, int]]:
    """(query length, sequence length) pairs that reach every constexpr variant of the attention kernels:
    the prefill tile classes (query length <= 16, <= 4096, above; kernels/triton_attention.py ``_config``)
    and decode with one split and with each power-of-two count of splits (64-token minimum partition)."""
    cases = [(q, q) for q in (2, 17, 4097) if q <= min(max_num_batched_tokens, max_model_len)]
    seq_len = 64
    while seq_len < max_model_len:
        cases.append((1, seq_len))
        seq_len *= 2
    cases.append((1, max_model_len))
    return cases


class ModelRunner:
    def __init__(
        self,
        hf_config,
        weights,
        dtype: torch.dtype,
        device: torch.device,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        tp: TPGroup = SINGLE,
        seed: int = 0,
    ) -> None:
        self.hf_config = hf_config
        self.dtype = dtype
        self.device = device
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.block_size = cache_config.block_size
        self.tp = tp
        torch.manual_seed(seed)
        cls = get_model_class(getattr(hf_config, "architectures", None))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = cls(hf_config, tp)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.load_weights(weights)
        self.model.eval()
        self.vocab_size = hf_config.vocab_size
        self.sampler = Sampler(self.vocab_size, device, seed)
        self.staging = HostStaging(device)  # each step's inputs reach the GPU through pinned memory
        self.requests: dict[str, RequestState] = {}
        max_len = scheduler_config.max_model_len
        self.max_blocks_per_seq = -(-max_len // self.block_size)
        self.max_rows = scheduler_config.max_num_seqs
        self.block_table = np.zeros((self.max_rows, self.max_blocks_per_seq), dtype=np.int32)
        self.free_rows = list(range(self.max_rows - 1, -1, -1))
        self.num_blocks = 0
        self.graphs = None
        # Async scheduling: the last step's sampled ids on the device, and each sampled request's index in
        # them, for the next step's placeholder inputs (-1: "the token this request sampled last step").
        self._prev_sampled: torch.Tensor | None = None
        self._prev_index: dict[str, int] = {}
        # Generators of seeded requests that were preempted: they continue the same stream when resumed.
        self._parked_generators: dict[str, torch.Generator] = {}
        self.drafter = None  # a DraftModel when speculative decoding uses one; set before sizing the KV pool
        self.grammars: GrammarCompiler | None = None  # structured outputs; set by the engine on the sampling rank

    # ----------------------------------------------------------------------------- KV cache
    def determine_num_blocks(self) -> int:
        """KV capacity in blocks: explicit on CPU, profiled against gpu_memory_utilization on CUDA."""
        per_block = self.kv_bytes_per_token() * self.block_size
        cc = self.cache_config
        if cc.num_kv_cache_tokens is not None:
            return -(-cc.num_kv_cache_tokens // self.block_size)
        if self.device.type != "cuda":
            # CPU default: 1 GiB of KV, but never less than one full-length sequence.
            min_blocks = self.max_blocks_per_seq
            return max(min_blocks, (1 << 30) // per_block)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        budget = total * cc.gpu_memory_utilization - peak - max(non_torch, 0)
        num = int(budget // per_block)
        if num < self.max_blocks_per_seq:
            raise ValueError(
                f"not enough GPU memory for the KV cache of one {self.scheduler_config.max_model_len}-token "
                f"sequence ({num} blocks fit); raise gpu_memory_utilization or lower max_model_len"
            )
        return num

    @torch.inference_mode()
    def _profile_run(self) -> None:
        n = min(self.scheduler_config.max_num_batched_tokens, self.scheduler_config.max_model_len)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        hidden = self.model(ids, pos, None)
        self.model.compute_logits(hidden[-self.scheduler_config.max_num_seqs:])
        del hidden
        if self.drafter is not None:
            self.drafter.profile_run(n, self.scheduler_config.max_num_seqs)
        torch.cuda.synchronize(self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = []
        for attn in self.model.layers_attention():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append((attn.k_cache, attn.v_cache))
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num_blocks, self.block_size)
        if self.device.type == "cuda":
            self.warm_up()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile every attention-kernel variant serving can meet, before the first request: one forward per
        prefill tile class and per decode split-count class (the kernels' constexpr variants), on block 0
        of the fresh cache with no KV written. Without it the first requests pay about a second per variant
        (measured on an H200: workload (a)'s prefill steps took 369 ms instead of 197)."""
        t0 = time.monotonic()
        cases = warm_up_cases(self.scheduler_config.max_num_batched_tokens, self.scheduler_config.max_model_len)
        models = [self.model] + ([self.drafter.model] if self.drafter is not None else [])
        for model in models:
            for q_len, seq_len in cases:
                model(*self._warm_up_inputs(q_len, seq_len))
        torch.cuda.synchronize(self.device)
        logger.info("compiled attention kernels for %d shapes in %.1fs", len(cases) * len(models),
                    time.monotonic() - t0)

    def _warm_up_inputs(self, q_len: int, seq_len: int):
        dev = self.device
        width = -(-seq_len // self.block_size)
        meta = AttentionMetadata(
            slot_mapping=torch.full((q_len,), -1, dtype=torch.long, device=dev),  # -1: write nothing
            block_tables=torch.zeros((1, width), dtype=torch.int32, device=dev),  # every page is block 0
            seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, q_len], dtype=torch.int32, device=dev),
            max_query_len=q_len,
            max_seq_len=seq_len,
        )
        ids = torch.zeros(q_len, dtype=torch.long, device=dev)
        positions = torch.arange(seq_len - q_len, seq_len, device=dev)
        return ids, positions, meta

    def kv_bytes_per_token(self) -> int:
        """KV bytes one token slot costs on this rank: the target's, plus the draft model's that shares it."""
        per_tok = kv_bytes_per_token(self.hf_config, self.dtype, self.tp)
        return per_tok + (self.drafter.kv_bytes_per_token() if self.drafter is not None else 0)

    # ----------------------------------------------------------------------------- state
    def _add_request(self, nr) -> None:
        old = self.requests.pop(nr.req_id, None)
        if old is not None:  # a request the runner still holds (defensive: preemption frees the row)
            self.free_rows.append(old.row)
        if not self.free_rows:
            raise RuntimeError("persistent batch is full: more running requests than max_num_seqs")
        gen = self._parked_generators.pop(nr.req_id, None)  # resumed after preemption: same stream
        if gen is None and old is not None:
            gen = old.generator
        if gen is None and nr.sampling_params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(nr.sampling_params.seed)
        self.requests[nr.req_id] = RequestState(
            self.free_rows.pop(), nr.sampling_params, gen, nr.prompt_token_ids, list(nr.output_token_ids),
            nr.eos_token_ids,
        )

    def _remove_request(self, req_id: str, preempted: bool = False) -> None:
        st = self.requests.pop(req_id, None)
        if st is not None:
            self.free_rows.append(st.row)
            if preempted and st.generator is not None:
                self._parked_generators[req_id] = st.generator
        if not preempted:
            self._parked_generators.pop(req_id, None)

    # ----------------------------------------------------------------------------- execute
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput, deferred: bool = False) -> ModelRunnerOutput | DeferredOutput:
        """Run one step. ``deferred`` (async scheduling; no drafts, no host-synchronising requests): return
        before the device finishes, with the sampled ids in a ``DeferredOutput``."""
        with staging_scope(self.staging):  # the sampler's small copies share the step's pinned region
            return self._execute(so, deferred)

    def _execute(self, so: SchedulerOutput, deferred: bool) -> ModelRunnerOutput | DeferredOutput:
        for rid in so.finished_req_ids:
            self._remove_request(rid)
        for rid in so.preempted_req_ids:  # their blocks are gone; they return as new requests
            self._remove_request(rid, preempted=True)
        for rid, kept in so.num_blocks_kept.items():  # rejected drafts gave their blocks back
            st = self.requests.get(rid)
            if st is not None:
                st.num_blocks = kept
        for nr in so.new_reqs:
            self._add_request(nr)
        if so.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput([], None, None)
        self.staging.begin_step()
        bs = self.block_size
        states = [self.requests[rid] for rid in so.req_ids]
        table = self.block_table
        for st, new_ids in zip(states, so.new_block_ids, strict=True):
            if new_ids:
                n = len(new_ids)
                table[st.row, st.num_blocks:st.num_blocks + n] = new_ids
                st.num_blocks += n
        draft_probs = None
        if self.drafter is not None and so.spec_token_ids:  # fills in the drafts before they are input
            draft_probs = self.drafter.propose(self, so, states)
        rows = np.fromiter((st.row for st in states), dtype=np.int64, count=len(states))
        num_sched = np.asarray(so.num_scheduled_tokens, dtype=np.int64)
        starts = np.asarray(so.num_computed_tokens, dtype=np.int64)
        total = int(num_sched.sum())
        cu = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(num_sched, out=cu[1:])
        # positions: for each request, start .. start + n - 1
        token_req = np.repeat(np.arange(len(states)), num_sched)
        positions = np.arange(total, dtype=np.int64) - cu[token_req] + starts[token_req]
        block_tables = table[rows]
        slots = block_tables[token_req, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = starts + num_sched
        dev = self.device
        ids_np = np.fromiter((t for ids in so.token_ids for t in ids), dtype=np.int64, count=total)
        ids_t = self.staging.to_device(ids_np, torch.long)
        placeholders = np.flatnonzero(ids_np < 0)
        if placeholders.size:  # tokens the previous (deferred) step sampled, still only on the device
            if not self._prev_index:
                raise RuntimeError("a step's inputs name tokens sampled by a previous step, but that step did "
                                   "not keep them on the device (a deferred step must precede it)")
            prev_index = self._prev_index
            src = [prev_index[so.req_ids[r]] for r in token_req[placeholders].tolist()]
            ids_t[self.staging.to_device(placeholders, torch.long)] = self._prev_sampled[
                self.staging.to_device(src, torch.long)]
        if not deferred:  # this step's samples reach the host: the next step's inputs are all real tokens
            self._prev_index = {}
        hidden, tok_start, tok_end = self.run_model(
            self.model, self.graphs, ids_t, positions, slots, block_tables, seq_lens, cu, num_sched, starts
        )

        sample_idx = [i for i, s in enumerate(so.do_sample) if s]
        spec = so.spec_token_ids
        spec_idx = [i for i in sample_idx if so.req_ids[i] in spec] if spec else []
        if spec_idx:
            sample_idx = [i for i in sample_idx if so.req_ids[i] not in spec]
        plp_reqs = [
            i for i, st in enumerate(states)
            if st.params.prompt_logprobs is not None and starts[i] < len(st.prompt_token_ids)
        ]
        prompt_logprobs = self._prompt_logprobs(so, states, hidden, tok_start, plp_reqs) if plp_reqs else None

        sampled = [-1] * len(states)
        logprobs = None
        verified = None
        if sample_idx or spec_idx:
            last = tok_end[sample_idx] - 1
            if spec_idx:  # every scheduled position of a request with drafts: one logit row per draft + 1
                last = np.concatenate([last, *(np.arange(tok_start[i], tok_end[i]) for i in spec_idx)])
            logits = self.model.compute_logits(hidden.index_select(0, self.staging.to_device(last, torch.long)))
            if logits is None:  # a tensor-parallel rank other than 0: it joined the gather; rank 0 samples
                if deferred and sample_idx:  # the next step's placeholder inputs are rank 0's samples
                    ids = torch.empty(len(sample_idx), dtype=torch.long, device=dev)
                    self._remember_sampled(so, sample_idx, self.tp.broadcast(ids))
                return ModelRunnerOutput(sampled, None, None)
            if spec_idx:
                verified = self._verify(so, states, spec_idx, logits[len(sample_idx):], draft_probs)
                for i, (toks, _) in verified.items():
                    sampled[i] = toks[-1]
                logits = logits[:len(sample_idx)]
        if deferred:
            if sample_idx:
                ids = self.sampler.sample_ids(logits, self._rows([states[i] for i in sample_idx]))
                ids = self.tp.broadcast(ids.to(torch.long).contiguous())  # the other ranks' next inputs
            else:
                ids = torch.empty(0, dtype=torch.long, device=dev)
            self._remember_sampled(so, sample_idx, ids)
            if self.tp.rank != 0:  # nothing was sampled here (a step of prefill chunks only)
                return ModelRunnerOutput(sampled, None, None)
            return DeferredOutput(ids, sample_idx, states, len(states))
        if sample_idx:
            rows_in = self._rows([states[i] for i in sample_idx])
            out = self.sampler(logits, rows_in)
            for j, i in enumerate(sample_idx):
                sampled[i] = out.token_ids[j]
                states[i].output_token_ids.append(out.token_ids[j])
            if any(lp is not None for lp in out.logprobs):
                logprobs = [None] * len(states)
                for j, i in enumerate(sample_idx):
                    logprobs[i] = out.logprobs[j]
        return ModelRunnerOutput(sampled, logprobs, prompt_logprobs, verified)

    def _rows(self, states: list[RequestState]) -> list[SamplingRow]:
        """The sampling rows of ``states``, with this step's grammar masks (structured outputs) filled in."""
        rows = [st.row_for_sampling(self.grammars) for st in states]
        constrained = [j for j, st in enumerate(states) if st.grammar is not None]
        if constrained:
            masks = self.grammars.fill_bitmasks([states[j].grammar for j in constrained])
            for k, j in enumerate(constrained):
                rows[j].allowed = masks[k]
        return rows

    def _remember_sampled(self, so: SchedulerOutput, sample_idx: list[int], ids: torch.Tensor) -> None:
        """Keep a deferred step's sampled ids on the device for the next step's placeholder inputs."""
        self._prev_sampled = ids
        self._prev_index = {so.req_ids[i]: j for j, i in enumerate(sample_idx)}

    def _verify(self, so, states, spec_idx, logits, draft_probs=None) -> dict[int, VerifiedTokens]:
        rows, drafts, eos = [], [], []
        for i in spec_idx:
            st = states[i]
            rows.append(SamplingRow(st.params, st.generator, st.prompt_token_ids, st.output_token_ids, []))
            drafts.append(so.spec_token_ids[so.req_ids[i]])
            eos.append(st.eos_token_ids)
        q = [draft_probs.get(so.req_ids[i]) for i in spec_idx] if draft_probs else None
        results = verify_drafts(self.sampler, logits, rows, drafts, eos, q)
        for i, (toks, _) in zip(spec_idx, results, strict=True):
            states[i].output_token_ids.extend(toks)
        return dict(zip(spec_idx, results, strict=True))

    def run_model(self, model, graphs, ids_t, positions, slots, block_tables, seq_lens, cu, num_sched, starts):
        """One forward of ``model`` (the target, or the draft with its own graphs): a captured graph when
        the step's shape has one, padding each request to the graph's query length, else eager. Returns the
        hidden states and, per request, the rows ``[tok_start, tok_end)`` of its real tokens in them."""
        dev = self.device
        bs = self.block_size
        q = graphs.query_len_for(num_sched, starts) if graphs is not None else None
        if q == 1:
            width = int(-(-seq_lens.max() // bs))
            hidden = graphs.run(ids_t, positions, slots, block_tables[:, :width], seq_lens)
            return hidden, cu[:-1], cu[1:]
        if q is not None:
            n = len(num_sched)
            tok_start = np.arange(n, dtype=np.int64) * q
            real = np.arange(q)[None, :] < num_sched[:, None]  # [n, q], row-major = request then token
            slots_p = np.full((n, q), -1, dtype=np.int64)
            slots_p[real] = slots
            positions_p = (starts[:, None] + np.arange(q)[None, :]).ravel()
            if real.all():
                ids_p = ids_t
            else:
                ids_p = torch.zeros(n * q, dtype=torch.long, device=dev)
                ids_p[self.staging.to_device(np.flatnonzero(real), torch.long)] = ids_t
            seq_p = starts + q
            width = int(-(-seq_p.max() // bs))
            hidden = graphs.run(ids_p, positions_p, slots_p.ravel(), block_tables[:, :width],
                                seq_p, q)
            return hidden, tok_start, tok_start + num_sched
        meta = self._device_meta(slots, block_tables, seq_lens, cu, num_sched)
        hidden = model(ids_t, self.staging.to_device(positions, torch.long), meta)
        return hidden, cu[:-1], cu[1:]

    def _device_meta(self, slots, block_tables, seq_lens, cu, num_sched) -> AttentionMetadata:
        stage = self.staging.to_device
        width = int(-(-seq_lens.max() // self.block_size))
        return AttentionMetadata(
            slot_mapping=stage(slots, torch.long),
            block_tables=stage(block_tables[:, :width], torch.int32),
            seq_lens=stage(seq_lens, torch.int32),
            query_start_loc=stage(cu, torch.int32),
            max_query_len=int(num_sched.max()),
            max_seq_len=int(seq_lens.max()),
        )

    def capture_cuda_graphs(self, spec_query_len: int | None = None) -> None:
        """Capture decode graphs (CUDA only; call after the KV cache exists). ``spec_query_len`` (k + 1 with
        speculative decoding) adds graphs of that many query tokens per request, for verification steps and
        for the draft model's catch-up; the draft model gets its own."""
        from pagedserve.runtime.cuda_graphs import DecodeGraphs

        query_lens = (1, spec_query_len) if spec_query_len else (1,)
        max_len = self.scheduler_config.max_model_len
        self.graphs = DecodeGraphs(self.model, self.max_rows, self.max_blocks_per_seq, max_len, self.device, query_lens,
                                   staging=self.staging)
        self.graphs.capture()
        if self.drafter is not None:
            self.drafter.graphs = DecodeGraphs(
                self.drafter.model, self.max_rows, self.max_blocks_per_seq, max_len, self.device, query_lens,
                staging=self.staging,
            )
            self.drafter.graphs.capture()

    def _prompt_logprobs(self, so, states, hidden, tok_start, plp_reqs) -> dict[str, list]:
        """Logprob of each prompt token given the tokens before it (None for the first), chunk by chunk."""
        result: dict[str, list] = {}
        for i in plp_reqs:
            st = states[i]
            start = so.num_computed_tokens[i]
            n = so.num_scheduled_tokens[i]
            prompt = st.prompt_token_ids
            # Position p predicts token p + 1; only those inside the prompt count.
            end = min(start + n, len(prompt) - 1)
            entries: list = [None] if start == 0 else []
            if end > start:
                h = hidden[int(tok_start[i]): int(tok_start[i]) + (end - start)]
                logits = self.model.compute_logits(h)
                if logits is None:  # not tensor-parallel rank 0
                    continue
                lp = torch.log_softmax(logits.float(), dim=-1)
                targets = prompt[start + 1: end + 1]
                for j, tok in enumerate(targets):
                    entries.append(compute_logprobs(lp[j], torch.tensor(tok), st.params.prompt_logprobs))
            result[so.req_ids[i]] = entries
        return result
