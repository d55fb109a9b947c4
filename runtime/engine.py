"""EngineArgs (every user knob, validated) and EngineCore (schedule -> run -> update, one screen)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.runtime.config import CacheConfig, SchedulerConfig, resolve_dtype
from pagedserve.runtime.kv_cache_manager import KVCacheManager
from pagedserve.runtime.loader import ModelSource, load_model_source
from pagedserve.runtime.model_runner import ModelRunner, kv_bytes_per_token
from pagedserve.runtime.request import Request, RequestStatus
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.scheduler import RequestUpdate, Scheduler
from pagedserve.runtime.spec_decode import NgramProposer, SpecDecodeStats, SpeculativeConfig
from pagedserve.runtime.structured_outputs import GrammarCompiler

logger = logging.getLogger("pagedserve.engine")


@dataclass
class EngineArgs:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    block_size: int = 16
    num_kv_cache_tokens: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int = 0
    scheduling_policy: str = "fcfs"
    device: str = "auto"
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    speculative_config: dict | None = None
    # Schedule step N+1 while step N runs on the device (sampled ids stay there; the host copy is waited for
    # after N+1 is launched; with tensor parallelism rank 0 broadcasts them to the other ranks on the device).
    # None: on with CUDA and no speculative decoding.
    async_scheduling: bool | None = None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but no CUDA device is available")
        return torch.device(self.device)


@dataclass(frozen=True)
class EngineInfo:
    """What a front end needs to know of a loaded engine (picklable: it crosses to the server process when
    the engine core runs in a process of its own)."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_blocks: int
    load_time_s: float
    dtype: str
    enable_prefix_caching: bool
    gpu_memory_utilization: float

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate one request against the model; raises ValueError naming the problem."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt: must contain at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt: {n} tokens is too long for max_model_len={self.max_model_len} "
                f"(at least one token must remain for the output)"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return Request(request_id, prompt_token_ids, params, max_tokens, self.eos_token_ids, arrival_time, priority)


class EngineCore:
    """The inner loop: owns the scheduler (and through it the KV-cache manager) and the model runner."""

    def __init__(self, args: EngineArgs, source: ModelSource | None = None) -> None:
        t0 = time.monotonic()
        self.args = args
        self.source = source or load_model_source(args.model)
        cfg = self.source.config
        self.device = args.resolve_device()
        config_dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        self.dtype = resolve_dtype(args.dtype, config_dtype, self.device)
        self.max_model_len = self._resolve_max_model_len(cfg, args.max_model_len)
        self.spec_config = (
            SpeculativeConfig.from_dict(args.speculative_config) if args.speculative_config else None
        )
        max_batched = args.max_num_batched_tokens or max(8192, args.max_num_seqs)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=self.max_model_len,
            policy=args.scheduling_policy,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
        )
        self.cache_config = CacheConfig(
            block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_kv_cache_tokens=args.num_kv_cache_tokens,
            enable_prefix_caching=args.enable_prefix_caching,
        )
        # Speculative decoding: verification steps run k + 1 query tokens per request, captured as graphs of
        # their own (at every tensor-parallel degree; each rank captures the same shapes).
        spec_query_len = self.spec_config.num_speculative_tokens + 1 if self.spec_config is not None else None
        if args.tensor_parallel_size == 1:
            self.runner = ModelRunner(
                cfg, self.source.iter_weights(), self.dtype, self.device, self.cache_config,
                self.scheduler_config, seed=args.seed,
            )
        else:  # rank 0 here, ranks 1..N-1 in worker processes; same interface as ModelRunner
            from pagedserve.runtime.distributed import TensorParallelRunner

            self.runner = TensorParallelRunner(
                self.source, self.dtype, self.device, self.cache_config, self.scheduler_config,
                args.tensor_parallel_size, seed=args.seed,
                capture_cuda_graphs=self.device.type == "cuda" and not args.enforce_eager,
                spec_query_len=spec_query_len,
            )
        drafter = self._load_draft_model(self.spec_config)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        if self.device.type == "cuda" and not args.enforce_eager:
            self.runner.capture_cuda_graphs(spec_query_len=spec_query_len)
        self.kv = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        self.proposer = self._make_proposer(self.spec_config)
        self.eos_token_ids = self.source.eos_token_ids
        self.grammars = GrammarCompiler(self.source.tokenizer, cfg.vocab_size, self.eos_token_ids)
        self.grammars.prepare()
        self.runner.grammars = self.grammars
        self.async_scheduling = self._resolve_async_scheduling(args)
        self._inflight: tuple = ()  # (SchedulerOutput, DeferredOutput) of the step still on the device
        self.vocab_size = cfg.vocab_size
        self.load_time_s = time.monotonic() - t0
        self.info = EngineInfo(
            max_model_len=self.max_model_len, vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids,
            block_size=args.block_size, num_blocks=num_blocks, load_time_s=self.load_time_s,
            dtype=str(self.dtype).replace("torch.", ""), enable_prefix_caching=args.enable_prefix_caching,
            gpu_memory_utilization=args.gpu_memory_utilization,
        )
        self.last_step_shape = (0, 0)  # (requests, tokens) of the last step
        capacity = num_blocks * args.block_size
        per_tok = kv_bytes_per_token(cfg, self.dtype, self.runner.tp)
        if drafter is not None:  # the draft's KV shares every slot
            per_tok += drafter.kv_bytes_per_token()
        logger.info(
            "model loaded in %.1fs (%s, %s on %s); KV cache: %d tokens (%d blocks of %d, %.2f GiB); "
            "maximum concurrency for %d tokens per request: %.2fx",
            self.load_time_s, type(self.runner.model).__name__, str(self.dtype).replace("torch.", ""),
            self.device, capacity, num_blocks, args.block_size, capacity * per_tok / 2**30,
            self.max_model_len, capacity / self.max_model_len,
        )

    def _resolve_async_scheduling(self, args: EngineArgs) -> bool:
        if args.async_scheduling is not None and not isinstance(args.async_scheduling, bool):
            raise ValueError(f"async_scheduling: must be true, false or null, got {args.async_scheduling!r}")
        if args.async_scheduling is None:
            return self.device.type == "cuda" and self.spec_config is None
        if args.async_scheduling and self.spec_config is not None:
            raise ValueError(
                "async_scheduling: not supported with speculative decoding (drafts are made from the previous "
                "step's tokens on the host)"
            )
        return bool(args.async_scheduling)

    @staticmethod
    def _resolve_max_model_len(cfg, requested: int | None) -> int:
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True):
            # Sliding-window attention is not implemented: serve only lengths where it changes nothing.
            limit = min(limit, int(window))
        if requested is None:
            return limit
        if requested < 1 or requested > limit:
            raise ValueError(f"max_model_len: must be in [1, {limit}] for this model, got {requested}")
        return requested

    def _load_draft_model(self, sc: SpeculativeConfig | None):
        """The draft_model method's draft, attached to the runner before the KV pool is sized (its KV shares
        the pool's slots, see runtime/draft_model.py)."""
        if sc is None or sc.method != "draft_model":
            return None
        if self.args.tensor_parallel_size != 1:
            raise ValueError(
                "speculative_config: the draft_model method runs with tensor_parallel_size=1 only; "
                "use the ngram method with tensor parallelism"
            )
        from pagedserve.runtime.draft_model import DraftModel

        drafter = DraftModel(load_model_source(sc.model), self.source.config, self.dtype, self.device,
                             self.max_model_len)
        self.runner.drafter = drafter
        return drafter

    def _make_proposer(self, sc: SpeculativeConfig | None):
        if sc is None:
            return None
        self.scheduler.spec_stats = SpecDecodeStats(sc.num_speculative_tokens)
        if sc.method == "draft_model":
            from pagedserve.runtime.draft_model import DraftModelSlots

            return DraftModelSlots(sc.num_speculative_tokens)
        return NgramProposer(sc.num_speculative_tokens, sc.prompt_lookup_min, sc.prompt_lookup_max)

    @property
    def spec_stats(self) -> SpecDecodeStats | None:
        """Speculative-decoding counters (None when speculation is off)."""
        return self.scheduler.spec_stats

    # ----------------------------------------------------------------------------- requests
    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate one request against the model; raises ValueError naming the problem."""
        return self.info.make_request(request_id, prompt_token_ids, params, priority, arrival_time)

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """ValueError if the request's grammar cannot be used here (it does not compile for this tokenizer,
        or speculative decoding is on)."""
        so = params.structured_outputs
        if so is None:
            return
        if self.spec_config is not None:
            raise ValueError("structured_outputs: not supported while this server runs speculative decoding")
        self.grammars.compile(so)

    def add_request(self, req: Request) -> None:
        """Queue a validated request; ValueError for what only the engine can check (its grammar)."""
        self.check_structured_outputs(req.sampling_params)
        self.scheduler.add_request(req)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def finish_requests(self, req_ids: list[str]) -> None:
        """Stop requests the frontend saw finish (a stop string)."""
        for rid in req_ids:
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_STOPPED)

    def has_unfinished(self) -> bool:
        """Requests remain, or a step is still on the device (its outputs come with the next step)."""
        return self.scheduler.has_unfinished() or bool(self._inflight)

    def check_health(self) -> None:
        """Raise if the engine can no longer serve (a tensor-parallel worker died); cheap, for liveness probes
        and idle loops, where no step would notice."""
        check = getattr(self.runner, "check_health", None)
        if check is not None:
            check()

    def shutdown(self) -> None:
        """Release what outlives the object on its own: tensor-parallel worker processes (no-op at TP=1)."""
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()

    # ----------------------------------------------------------------------------- the step
    def step(self) -> list[RequestUpdate]:
        """One step; returns what it produced. With async scheduling, what the *previous* step produced:
        this step is scheduled and launched first, then the previous one's tokens are read back."""
        overlap = self.async_scheduling and self.scheduler.num_host_sync_requests == 0
        if self._inflight and not overlap:
            return self._finish_inflight()  # a request needs every token on the host: drain first
        if overlap:
            return self._step_async()
        sched_out = self.scheduler.schedule()
        self.last_step_shape = (len(sched_out.req_ids), sched_out.total_num_scheduled_tokens)
        if sched_out.is_empty:
            if sched_out.finished_req_ids:
                self.runner.execute(sched_out)  # let the runner drop finished requests' state
            return []
        run_out = self.runner.execute(sched_out)
        updates = self.scheduler.update(
            sched_out, run_out.sampled_token_ids, run_out.logprobs, run_out.prompt_logprobs, run_out.verified
        )
        if self.proposer is not None:
            self._propose()
        return updates

    def _step_async(self) -> list[RequestUpdate]:
        sched_out = self.scheduler.schedule(async_mode=True)
        self.last_step_shape = (len(sched_out.req_ids), sched_out.total_num_scheduled_tokens)
        pending = None
        if not sched_out.is_empty:
            pending = self.runner.execute(sched_out, deferred=True)
        elif sched_out.finished_req_ids:
            self.runner.execute(sched_out)
        updates = self._finish_inflight() if self._inflight else []
        if pending is not None:
            self._inflight = (sched_out, pending)
        return updates

    def _finish_inflight(self) -> list[RequestUpdate]:
        sched_out, pending = self._inflight
        self._inflight = ()
        out = pending.get()
        return self.scheduler.update(sched_out, out.sampled_token_ids)

    def _propose(self) -> None:
        """Draft tokens for every request whose next step is a decode (the scheduler trims them to fit)."""
        propose = self.proposer.propose
        for req in self.scheduler.running:
            tokens = req.all_token_ids
            if req.num_computed_tokens == len(tokens) - 1:
                req.spec_token_ids = propose(tokens)
