"""Speculative decoding with a draft model: a smaller model of the same vocabulary proposes ``k`` tokens
autoregressively, the target verifies them in one forward (``rejection_sampler``).

Where the draft's KV lives. The draft gets its own KV tensors, one pair per draft layer, with exactly as
many blocks as the target's pool, addressed by the *target's* block tables and slots. A block id therefore
names one slot range in both caches, and the target's block accounting (allocation, prefix sharing,
preemption, the slots rejected drafts give back) covers the draft with no second manager. The cost: every
block carries the draft's KV too, so a token slot costs ``target + draft`` KV bytes (for a draft equal to
the target, twice the memory per token), and the pool is sized for that: on CUDA the profiler divides the
free memory by the sum, on CPU the 1 GiB default is divided by the sum, and an explicit
``num_kv_cache_tokens`` is the number of token slots, each holding both models' KV.

When it runs. The engine reserves ``k`` draft positions for each decoding request (``DraftModelSlots``:
placeholder ids the scheduler fits into the token budget and gives KV slots, exactly as it does n-gram
drafts). Inside ``ModelRunner.execute``, once this step's blocks are in the block tables and before the
target forward, ``DraftModel.propose`` replaces the placeholders with real drafts:

1. catch-up: one forward over every verified token the draft has not computed yet, per request (the
   whole prompt of a new or resumed request, else the tokens accepted last step and the target's own
   token); its last logits give draft 0;
2. ``k - 1`` one-token forwards, each feeding the previous draft.

Draft ``j`` is written at position ``n - 1 + j`` (``n`` verified tokens), which is inside the slots the
scheduler allocated for the target's ``1 + k`` positions, so the draft never touches a slot its request
does not hold. Only verified tokens count as computed for the draft (``RequestState.num_draft_computed``):
the KV it wrote for draft tokens is recomputed next step if they were accepted and simply overwritten if
not. A new or resumed request recomputes its draft KV from position 0, even when the target had a
prefix-cache hit: a cached block is guaranteed to hold the target's KV, not the draft's (the request that
filled it may have finished before the draft caught up). Rewriting a shared block writes the same tokens'
KV again, so requests reading it see the same values.

The draft's logits go through the request's own processing, as the sampler would apply it at that
position (penalties and logit bias over the output including earlier drafts, EOS/stop ids masked below
``min_tokens``). Greedy requests take the argmax; sampling requests draw from ``q``, the processed logits
under the request's temperature, top-k, top-p and min-p, and ``q`` goes to the verifier, which keeps the
target's distribution exactly whatever ``q`` is. Only the acceptance rate depends on how close ``q`` is to
the target (a draft identical to the target is accepted every time, greedy or not, penalties or not).
"""

from __future__ import annotations

import numpy as np
import torch

from pagedserve.runtime.loader import ModelSource
from pagedserve.runtime.models import get_model_class
from pagedserve.runtime.parallel import SINGLE
from pagedserve.runtime.rejection_sampler import target_probs
from pagedserve.runtime.sampler import SamplingRow


class DraftModelSlots:
    """The engine-side proposer of the draft_model method: ``k`` placeholder tokens per decoding request,
    for the scheduler to budget and allocate; the runner's ``DraftModel`` fills in the real drafts."""

    def __init__(self, num_speculative_tokens: int) -> None:
        self.k = num_speculative_tokens

    def propose(self, token_ids: list[int]) -> list[int]:
        return [0] * self.k


class DraftModel:
    """The draft model and its KV tensors; runs inside the target's ``ModelRunner`` (tensor parallel 1)."""

    def __init__(self, source: ModelSource, target_config, dtype: torch.dtype, device: torch.device,
                 max_model_len: int) -> None:
        cfg = source.config
        if cfg.vocab_size != target_config.vocab_size:
            raise ValueError(
                f"speculative_config.model: the draft's vocabulary ({cfg.vocab_size} tokens, {source.path}) "
                f"differs from the target's ({target_config.vocab_size}); a draft model must share the "
                "target's tokenizer and vocabulary"
            )
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos is not None and max_pos < max_model_len:
            raise ValueError(
                f"speculative_config.model: the draft supports {max_pos} positions, fewer than "
                f"max_model_len={max_model_len}; lower max_model_len or use another draft"
            )
        self.config = cfg
        self.dtype = dtype
        self.device = device
        cls = get_model_class(getattr(cfg, "architectures", None))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = cls(cfg, SINGLE)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.load_weights(source.iter_weights())
        self.model.eval()
        self.num_blocks = 0
        self.graphs = None  # DecodeGraphs of the draft, captured by the runner (CUDA)

    def kv_bytes_per_token(self) -> int:
        from pagedserve.runtime.model_runner import kv_bytes_per_token

        return kv_bytes_per_token(self.config, self.dtype, SINGLE)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """As many blocks as the target's pool: the same block ids address both."""
        self.num_blocks = num_blocks
        for attn in self.model.layers_attention():
            shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), None)
        self.model.compute_logits(hidden[-num_seqs:])

    # ----------------------------------------------------------------------------- proposing
    @torch.inference_mode()
    def propose(self, runner, so, states) -> dict[str, torch.Tensor | None]:
        """Fill ``so.spec_token_ids`` (and the tail of ``so.token_ids``) with draft tokens for every request
        that has draft positions; returns each one's draft distribution ``[m, vocab]`` (None when greedy)."""
        idx = [i for i, rid in enumerate(so.req_ids) if rid in so.spec_token_ids]
        rows, seqs, num_drafts = [], [], []
        for i in idx:
            st = states[i]
            seq = st.prompt_token_ids + st.output_token_ids
            if len(seq) != so.num_computed_tokens[i] + 1:
                raise RuntimeError(
                    f"draft model: request {so.req_ids[i]} has {len(seq)} verified tokens but "
                    f"{so.num_computed_tokens[i]} computed; drafts need exactly one uncomputed token"
                )
            rows.append(st.row)
            seqs.append(seq)
            num_drafts.append(len(so.spec_token_ids[so.req_ids[i]]))
        n = np.array([len(s) for s in seqs], dtype=np.int64)
        done = np.array([states[i].num_draft_computed for i in idx], dtype=np.int64)
        drafts: list[list[int]] = [[] for _ in idx]
        probs: list[list[torch.Tensor]] = [[] for _ in idx]

        # 1. Catch up on every verified token the draft has not computed; the last logits give draft 0.
        ids = [t for s, d in zip(seqs, done, strict=True) for t in s[d:]]
        positions = np.concatenate([np.arange(d, e) for d, e in zip(done, n, strict=True)])
        logits = self._forward(runner, np.array(rows), ids, positions, n - done, n)
        self._sample(runner, [states[i] for i in idx], list(range(len(idx))), logits, drafts, probs)
        for i, e in zip(idx, n, strict=True):
            states[i].num_draft_computed = int(e)

        # 2. One token per forward for the rest; a request leaves once it has its drafts.
        for j in range(1, max(num_drafts)):
            active = [r for r, m in enumerate(num_drafts) if m > j]
            pos = n[active] - 1 + j
            logits = self._forward(runner, np.array(rows)[active], [drafts[r][-1] for r in active], pos,
                                   np.ones(len(active), dtype=np.int64), pos + 1)
            self._sample(runner, [states[idx[r]] for r in active], active, logits, drafts, probs)

        out: dict[str, torch.Tensor | None] = {}
        for r, i in enumerate(idx):
            rid = so.req_ids[i]
            so.spec_token_ids[rid] = drafts[r]
            so.token_ids[i] = so.token_ids[i][:len(so.token_ids[i]) - num_drafts[r]] + drafts[r]
            out[rid] = torch.stack(probs[r]) if probs[r] else None
        return out

    def _forward(self, runner, rows, ids, positions, num_sched, seq_lens) -> torch.Tensor:
        """Draft logits at the last position of each request's query (float32)."""
        bs = runner.block_size
        cu = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(num_sched, out=cu[1:])
        token_req = np.repeat(np.arange(len(rows)), num_sched)
        block_tables = runner.block_table[rows]
        slots = block_tables[token_req, positions // bs].astype(np.int64) * bs + positions % bs
        ids_t = runner.staging.to_device(ids, torch.long)
        hidden, _, tok_end = runner.run_model(self.model, self.graphs, ids_t, positions, slots, block_tables,
                                              seq_lens, cu, num_sched, seq_lens - num_sched)
        last = runner.staging.to_device(tok_end - 1, torch.long)
        return self.model.compute_logits(hidden.index_select(0, last)).float()

    @staticmethod
    def _sample(runner, states, which, logits, drafts, probs) -> None:
        """Append one draft token per request ``which[j]`` (row ``j`` of ``logits``); keep ``q`` if sampling."""
        rows = []
        for st, r in zip(states, which, strict=True):
            p = st.params
            outputs = st.output_token_ids + drafts[r] if drafts[r] else st.output_token_ids
            suppressed: list[int] = []
            if len(outputs) < p.min_tokens:
                suppressed = list(p.stop_token_ids) + ([] if p.ignore_eos else list(st.eos_token_ids))
            rows.append(SamplingRow(p, None, st.prompt_token_ids, outputs, suppressed))
        logits = runner.sampler._apply_logit_processors(logits, rows)
        greedy = [st.params.temperature == 0.0 for st in states]
        argmax = logits.argmax(dim=-1).tolist() if any(greedy) else None
        sampling = [j for j, g in enumerate(greedy) if not g]
        q = target_probs(logits[sampling], [rows[j] for j in sampling]) if sampling else None
        for j, r in enumerate(which):
            if greedy[j]:
                drafts[r].append(argmax[j])
        for s, j in enumerate(sampling):
            gen = states[j].generator or runner.sampler.generator
            e = torch.empty_like(q[s]).exponential_(generator=gen)
            drafts[which[j]].append(int((q[s] / e).argmax()))  # the exponential race: a draw from q[s]
            probs[which[j]].append(q[s])
