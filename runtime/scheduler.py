"""Continuous-batching scheduler: one token budget per step, chunked prefill mixed with decodes,
prefix-cache hits, preemption by recompute, FCFS or priority order.

Never touches tensors. Its output describes the step completely (token ids included), so it can be sent
to tensor-parallel workers as is.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from pagedserve.runtime.config import SchedulerConfig
from pagedserve.runtime.kv_cache_manager import KVCacheManager
from pagedserve.runtime.request import Request, RequestStatus
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.spec_decode import SpecDecodeStats


@dataclass
class NewRequestData:
    """A request the runner has not seen (or has forgotten after preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]


@dataclass
class SchedulerOutput:
    """One step: which requests run, how many tokens each, their new blocks, and their input tokens."""

    new_reqs: list[NewRequestData] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step
    token_ids: list[list[int]] = field(default_factory=list)  # this step's input tokens per request
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended to each block table
    do_sample: list[bool] = field(default_factory=list)  # False for a prefill chunk short of the end
    finished_req_ids: list[str] = field(default_factory=list)  # since the last step: drop their state
    # Preempted by this schedule: the runner frees their rows (they come back as new requests).
    preempted_req_ids: list[str] = field(default_factory=list)
    # Speculative decoding: draft tokens to verify (also the tail of token_ids) per request that has some,
    # and block tables cut back to this many blocks after rejected drafts gave their slots back.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    num_blocks_kept: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    num_preempted: int = 0
    # Async scheduling: the requests (aligned with req_ids) whose num_computed_tokens this schedule already
    # advanced, their sampled tokens counted as pending until update(); None when scheduled synchronously.
    reqs: list[Request] | None = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class RequestUpdate:
    """What one step produced for one request."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0


class WaitingQueue:
    """FCFS deque or a priority heap (lower ``priority`` first, then arrival), with front re-insertion."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._deque: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()
        self._removed: set[str] = set()

    def __len__(self) -> int:
        return len(self._deque) if self.policy == "fcfs" else len(self._heap)

    def add(self, req: Request) -> None:
        if self.policy == "fcfs":
            self._deque.append(req)
        else:
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._seq), req))

    def add_front(self, req: Request) -> None:
        """A preempted request goes back ahead of the others (under priority, its key already orders it)."""
        if self.policy == "fcfs":
            self._deque.appendleft(req)
        else:
            self.add(req)

    def peek(self) -> Request:
        return self._deque[0] if self.policy == "fcfs" else self._heap[0][3]

    def pop(self) -> Request:
        return self._deque.popleft() if self.policy == "fcfs" else heapq.heappop(self._heap)[3]

    def remove(self, req: Request) -> None:
        if self.policy == "fcfs":
            self._deque.remove(req)
        else:
            self._heap = [e for e in self._heap if e[3] is not req]
            heapq.heapify(self._heap)

    def __iter__(self):
        return iter(self._deque) if self.policy == "fcfs" else (e[3] for e in sorted(self._heap))


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(config.policy)
        self.running: list[Request] = []
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0
        self.spec_stats: SpecDecodeStats | None = None  # set by the engine when speculative decoding is on
        self._num_blocks_kept: dict[str, int] = {}
        # Unfinished requests whose sampling needs the host each step (SamplingParams.needs_host_sync).
        self.num_host_sync_requests = 0

    # ----------------------------------------------------------------------------- bookkeeping
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        if req.sampling_params.needs_host_sync:
            self.num_host_sync_requests += 1
        self.waiting.add(req)

    def abort_requests(self, req_ids: list[str]) -> list[Request]:
        aborted = []
        running_aborted = False
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                running_aborted = True
            else:
                self.waiting.remove(req)
            req.status = RequestStatus.FINISHED_ABORTED
            self._free(req)
            aborted.append(req)
        if running_aborted:
            self.running = [r for r in self.running if not r.is_finished]
        return aborted

    def _free(self, req: Request) -> None:
        self.kv.free(req)
        del self.requests[req.request_id]
        if req.sampling_params.needs_host_sync:
            self.num_host_sync_requests -= 1
        self._finished_since_last_step.append(req.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ----------------------------------------------------------------------------- schedule
    def _pick_victim(self, candidates: list[Request]) -> Request:
        if self.config.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(req)

    def schedule(self, async_mode: bool = False) -> SchedulerOutput:
        """The next step. ``async_mode``: the previous step may still be running; its sampled tokens are
        pending (``Request.num_pending``), inputs that are pending tokens are -1, and this call advances
        ``num_computed_tokens`` itself (``update`` then only appends tokens)."""
        out = SchedulerOutput(finished_req_ids=self._finished_since_last_step)
        if async_mode:
            out.reqs = []
            add_req = out.reqs.append
        max_model_len = self.config.max_model_len
        self._finished_since_last_step = []
        if self._num_blocks_kept:
            out.num_blocks_kept = self._num_blocks_kept
            self._num_blocks_kept = {}
        budget = self.config.max_num_batched_tokens
        kv = self.kv
        long_cap = self.config.long_prefill_token_threshold

        # 1. Running requests, in order; preempt from the back when blocks run out.
        preempted: set[str] = set()
        block_size = kv.block_size
        req_to_blocks = kv.req_to_blocks
        running = self.running
        # Decode fast path, inlined: this loop runs once per running request per step.
        add_id, add_n, add_start = out.req_ids.append, out.num_scheduled_tokens.append, out.num_computed_tokens.append
        add_tokens, add_blocks, add_sample = out.token_ids.append, out.new_block_ids.append, out.do_sample.append
        num_fast = 0
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            start = req.num_computed_tokens
            tokens = req.all_token_ids
            pending = req.num_pending
            num_new = len(tokens) + pending - start
            if pending and (req.num_output_tokens + pending >= req.max_tokens
                            or len(tokens) + pending >= max_model_len):
                i += 1  # its pending token ends it by length: nothing more to compute
                continue
            if num_new == 1 and req.spec_token_ids:
                n_spec = self._schedule_drafts(out, req, budget)
                if n_spec:
                    budget -= n_spec
                    i += 1
                    continue
            if num_new == 1:
                end = start + 1
                if end % block_size and end <= block_size * len(req_to_blocks[req.request_id]):
                    # The token fits in the last block, which does not fill up: no allocation.
                    add_id(req.request_id)
                    add_n(1)
                    add_start(start)
                    add_tokens(tokens[start:] or [-1])  # empty: the input is the pending token
                    add_blocks([])
                    add_sample(True)
                    if async_mode:
                        add_req(req)
                        req.num_computed_tokens = end
                        req.num_pending += 1
                    num_fast += 1
                    budget -= 1
                    i += 1
                    continue
            if long_cap and num_new > long_cap:
                num_new = long_cap
            if num_new > budget:
                num_new = budget
            if num_new <= 0:
                i += 1
                continue
            new_ids = kv.allocate_slots(req, num_new)
            while new_ids is None:
                candidates = running[i + 1:]
                if not candidates:
                    break
                victim = self._pick_victim(candidates)
                running.remove(victim)
                self._preempt(victim)
                preempted.add(victim.request_id)
                new_ids = kv.allocate_slots(req, num_new)
            if new_ids is None:
                # Nothing left to preempt but the request itself.
                running.pop(i)
                self._preempt(req)
                preempted.add(req.request_id)
                continue
            self._add_to_output(out, req, num_new, new_ids)
            budget -= num_new
            i += 1

        out.total_num_scheduled_tokens += num_fast

        # 2. Waiting requests, while budget, sequence slots and blocks last (not in a step that preempted).
        if not preempted:
            self._schedule_waiting(out, budget, long_cap)
        out.num_preempted = len(preempted)
        if preempted:
            out.preempted_req_ids = list(preempted)
        return out

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, long_cap: int) -> None:
        kv = self.kv
        waiting = self.waiting
        now = time.monotonic()
        while len(waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = waiting.peek()
            if req.num_pending:
                break  # preempted while its last token was still being sampled: resume once it is known
            hits, num_hit_tokens = kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit_tokens
            if long_cap and num_new > long_cap:
                num_new = long_cap
            num_new = min(num_new, budget)
            new_ids = kv.allocate_slots(req, num_new, hits)
            if new_ids is None:
                break
            waiting.pop()
            if kv.enable_prefix_caching:
                kv.prefix_cache_queries += req.num_tokens
                kv.prefix_cache_hits += num_hit_tokens
            req.num_computed_tokens = num_hit_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.new_reqs.append(
                NewRequestData(
                    req.request_id,
                    req.prompt_token_ids,
                    req.output_token_ids,
                    req.sampling_params,
                    req.eos_token_ids,
                )
            )
            self._add_to_output(out, req, num_new, new_ids)
            budget -= num_new

    def _schedule_drafts(self, out: SchedulerOutput, req: Request, budget: int) -> int:
        """Schedule a decoding request's last token plus its draft tokens, if the budget, the request's
        limits and free blocks allow; returns the tokens scheduled (0: schedule it without drafts).

        Drafts never preempt anything: when blocks run short they are simply dropped."""
        drafts = req.spec_token_ids
        req.spec_token_ids = []
        # The verified step yields up to len(drafts) + 1 tokens: stay inside max_tokens and max_model_len.
        room = min(
            budget - 1,
            req.max_tokens - req.num_output_tokens - 1,
            self.config.max_model_len - req.num_tokens - 1,
        )
        if room <= 0:
            return 0
        if len(drafts) > room:
            drafts = drafts[:room]
        num_new = 1 + len(drafts)
        new_ids = self.kv.allocate_slots(req, num_new)
        if new_ids is None:
            return 0
        rid = req.request_id
        start = req.num_computed_tokens
        out.req_ids.append(rid)
        out.num_scheduled_tokens.append(num_new)
        out.num_computed_tokens.append(start)
        out.token_ids.append(req.all_token_ids[start:] + drafts)
        out.new_block_ids.append(new_ids)
        out.do_sample.append(True)
        out.spec_token_ids[rid] = drafts
        out.total_num_scheduled_tokens += num_new
        return num_new

    @staticmethod
    def _add_to_output(out: SchedulerOutput, req: Request, num_new: int, new_ids: list[int]) -> None:
        start = req.num_computed_tokens
        out.req_ids.append(req.request_id)
        out.num_scheduled_tokens.append(num_new)
        out.num_computed_tokens.append(start)
        end = start + num_new
        ids = req.all_token_ids[start:end]
        if len(ids) < num_new:  # the last input is the pending token (async scheduling)
            ids.append(-1)
        out.token_ids.append(ids)
        out.new_block_ids.append(new_ids)
        do_sample = end == len(req.all_token_ids) + req.num_pending
        out.do_sample.append(do_sample)
        out.total_num_scheduled_tokens += num_new
        if out.reqs is not None:
            out.reqs.append(req)
            req.num_computed_tokens = end
            if do_sample:
                req.num_pending += 1

    # ----------------------------------------------------------------------------- update
    def update(
        self,
        out: SchedulerOutput,
        sampled: list[int],
        logprobs: list | None = None,
        prompt_logprobs: dict[str, list] | None = None,
        verified: dict[int, tuple[list[int], list | None]] | None = None,
    ) -> list[RequestUpdate]:
        """Advance each scheduled request by its computed tokens and append its sampled token.

        ``sampled[i]`` is the token sampled for ``out.req_ids[i]`` (ignored where ``do_sample`` is False).
        ``verified[i]``, for a request that had draft tokens, holds the tokens its verification produced (the
        accepted drafts, then the target's own token) and their logprobs (or None).
        """
        updates: list[RequestUpdate] = []
        requests = self.requests
        max_model_len = self.config.max_model_len
        any_finished = False
        now = None
        running = RequestStatus.RUNNING
        append = updates.append
        step_reqs = out.reqs
        for i, (rid, num_scheduled, do_sample) in enumerate(
            zip(out.req_ids, out.num_scheduled_tokens, out.do_sample, strict=True)
        ):
            req = requests.get(rid)
            if step_reqs is None:
                if req is None or req.status != running:
                    continue  # aborted while the step ran
                req.num_computed_tokens += num_scheduled
            else:  # async: computed tokens were counted at schedule time; settle the pending token
                if req is not step_reqs[i]:
                    continue  # finished or aborted while the step ran
                if do_sample:
                    req.num_pending -= 1
                if req.status != running:
                    if do_sample and req.status == RequestStatus.PREEMPTED:
                        append(self._append_to_preempted(req, sampled[i]))
                    continue
            plp = prompt_logprobs.get(rid) if prompt_logprobs else None
            if not do_sample:
                if plp:
                    updates.append(RequestUpdate(rid, [], prompt_logprobs=plp))
                continue
            if verified is not None and i in verified:
                upd = self._update_verified(req, out, i, *verified[i])
                if upd.finish_reason is not None:
                    any_finished = True
                updates.append(upd)
                continue
            token = sampled[i]
            req.all_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now = now or time.monotonic()
            finish = self._stop_status(req, token, max_model_len)
            upd = RequestUpdate(
                rid,
                [token],
                None,
                None,
                [logprobs[i]] if logprobs is not None and logprobs[i] is not None else None,
                plp,
                req.num_cached_tokens if req.num_cached_tokens > 0 else 0,
            )
            if finish is not None:
                req.status = finish
                upd.finish_reason = finish.finish_reason
                upd.stop_reason = req.stop_reason
                self._free(req)
                any_finished = True
            append(upd)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return updates

    def _append_to_preempted(self, req: Request, token: int) -> RequestUpdate:
        """Async scheduling: a token sampled by a step that ran while its request was being preempted is
        the request's next output all the same (the step computed it from valid KV)."""
        req.all_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        upd = RequestUpdate(req.request_id, [token], num_cached_tokens=max(req.num_cached_tokens, 0))
        finish = self._stop_status(req, token, self.config.max_model_len)
        if finish is not None:
            self.waiting.remove(req)
            req.status = finish
            upd.finish_reason = finish.finish_reason
            upd.stop_reason = req.stop_reason
            self._free(req)
        return upd

    @staticmethod
    def _stop_status(req: Request, token: int, max_model_len: int) -> RequestStatus | None:
        """The finished status ``req`` reaches with ``token`` just appended (EOS, a stop id, a length), or None."""
        num_out = len(req.all_token_ids) - len(req.prompt_token_ids)
        params = req.sampling_params
        if num_out >= params.min_tokens and (req.eos_token_ids or params.stop_token_ids):
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_out >= req.max_tokens or len(req.all_token_ids) >= max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def _update_verified(
        self, req: Request, out: SchedulerOutput, i: int, tokens: list[int], logprobs: list | None
    ) -> RequestUpdate:
        """Append a verified request's accepted tokens in order, stopping at the first stop condition; give
        back the KV slots of its rejected drafts."""
        rid = req.request_id
        num_drafts = len(out.spec_token_ids[rid])
        num_accepted = len(tokens) - 1
        if self.spec_stats is not None:
            self.spec_stats.observe(num_drafts, num_accepted)
        # Positions of rejected drafts hold KV of tokens that are not the sequence's: not computed.
        req.num_computed_tokens -= num_drafts - num_accepted
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        max_model_len = self.config.max_model_len
        finish = None
        emitted = 0
        for token in tokens:
            req.all_token_ids.append(token)
            emitted += 1
            finish = self._stop_status(req, token, max_model_len)
            if finish is not None:
                break
        upd = RequestUpdate(
            rid, tokens[:emitted], None, None, logprobs[:emitted] if logprobs is not None else None, None,
            req.num_cached_tokens if req.num_cached_tokens > 0 else 0,
        )
        if finish is not None:
            req.status = finish
            upd.finish_reason = finish.finish_reason
            upd.stop_reason = req.stop_reason
            self._free(req)
        elif num_accepted < num_drafts:
            kept = self.kv.trim(req, req.num_computed_tokens)
            if kept is not None:
                self._num_blocks_kept[rid] = kept
        return upd

    def finish_request(self, req_id: str, status: RequestStatus, stop_reason=None) -> None:
        """Finish a request from outside the step (a stop string seen by the detokenizer)."""
        req = self.requests.get(req_id)
        if req is None or req.is_finished:
            return
        was_running = req.status == RequestStatus.RUNNING
        if not was_running:
            self.waiting.remove(req)
        req.status = status
        req.stop_reason = stop_reason
        self._free(req)
        if was_running:
            self.running = [r for r in self.running if not r.is_finished]
