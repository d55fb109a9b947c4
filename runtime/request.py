"""A request as the scheduler sees it: tokens, how many of them are computed, and its status."""

from __future__ import annotations

import enum
import time

from pagedserve.runtime.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything after ``PREEMPTED`` is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence being generated.

    The scheduler's single idea (after vLLM v1): ``num_computed_tokens`` catches up with
    ``len(all_token_ids)`` under a per-step token budget. Prefill, chunked prefill, prefix-cache hits and
    decode are all the same thing seen from here.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "all_token_ids",
        "sampling_params",
        "max_tokens",
        "eos_token_ids",
        "arrival_time",
        "priority",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "block_hashes",
        "stop_reason",
        "first_scheduled_time",
        "first_token_time",
        "spec_token_ids",
        "num_pending",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first schedule; -1 until then
        self.num_preemptions = 0
        self.block_hashes: list[int] = []  # chained hashes of this request's full blocks, filled lazily
        self.stop_reason: int | str | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # Proposed next tokens awaiting verification; never part of all_token_ids before they are accepted.
        self.spec_token_ids: list[int] = []
        # Async scheduling: tokens sampled by steps still running on the device, not yet in all_token_ids.
        # Their positions are already counted in num_computed_tokens; a step that needs one as input gets
        # a placeholder (-1) that the runner fills from the device.
        self.num_pending = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
