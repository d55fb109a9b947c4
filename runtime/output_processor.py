"""Turns the engine's per-step token updates into user-facing outputs: detokenization, stop strings,
logprobs in vLLM's shape, and fan-in of ``n > 1`` child requests into one ``RequestOutput``.

Runs on the frontend side (the offline ``LLM`` or the asyncio server), never inside the engine step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.runtime.detokenizer import IncrementalDetokenizer, TokenDecoder
from pagedserve.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.runtime.sampling_params import SamplingParams
from pagedserve.runtime.scheduler import RequestUpdate


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{index}_{parent_id}"


@dataclass
class _Child:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_token_ids: list[int] = field(default_factory=list)  # since the last output (for streaming)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: dict[str, _Child]
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    num_finished: int = 0


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = TokenDecoder(tokenizer)
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, _Parent] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[str]:
        """Register a request; returns the engine-side request ids of its ``n`` children."""
        children: dict[str, _Child] = {}
        for i in range(params.n):
            detok = IncrementalDetokenizer(
                self.decoder, params.skip_special_tokens, params.stop, params.include_stop_str_in_output
            )
            children[child_request_id(request_id, i, params.n)] = _Child(
                i, detok, logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
        parent = _Parent(request_id, prompt, list(prompt_token_ids), params, children)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = []
        self.parents[request_id] = parent
        for cid in children:
            self.child_to_parent[cid] = parent
        return list(children)

    def abort(self, request_id: str) -> list[str]:
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        for cid in parent.children:
            self.child_to_parent.pop(cid, None)
        return list(parent.children)

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprob_dict(self, entry) -> dict[int, Logprob]:
        chosen_lp, rank, top = entry
        d = {tid: Logprob(lp, r + 1) for r, (tid, lp) in enumerate(top)}
        return d, chosen_lp, rank

    def process(
        self, updates: list[RequestUpdate], finished_only: bool = False
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's updates. Returns outputs of requests that changed (only finished ones with
        ``finished_only``, as offline generation needs), and engine request ids that must be stopped
        because a stop string appeared (they are already finished here)."""
        touched: dict[str, _Parent] = {}
        to_stop: list[str] = []
        for upd in updates:
            parent = self.child_to_parent.get(upd.req_id)
            if parent is None:
                continue
            child = parent.children[upd.req_id]
            if child.finish_reason is not None:
                continue
            if not finished_only:
                touched[parent.request_id] = parent
            if upd.num_cached_tokens > parent.num_cached_tokens:
                parent.num_cached_tokens = upd.num_cached_tokens
            if upd.prompt_logprobs and parent.prompt_logprobs is not None and child.index == 0:
                self._add_prompt_logprobs(parent, upd.prompt_logprobs)
            if not upd.new_token_ids:
                continue
            child.token_ids.extend(upd.new_token_ids)
            child.new_token_ids.extend(upd.new_token_ids)
            if child.logprobs is not None and upd.logprobs:
                for tok, entry in zip(upd.new_token_ids, upd.logprobs, strict=True):
                    d, chosen_lp, rank = self._logprob_dict(entry)
                    if tok not in d:
                        d[tok] = Logprob(chosen_lp, rank)
                    child.logprobs.append(d)
                    child.cumulative_logprob += chosen_lp
            params = parent.params
            check_stop = len(child.token_ids) >= params.min_tokens
            hit = child.detok.add_tokens(upd.new_token_ids, check_stop=check_stop)
            if hit is not None and upd.finish_reason is None:
                child.finish_reason, child.stop_reason = "stop", hit
                to_stop.append(upd.req_id)
            elif upd.finish_reason is not None:
                child.finish_reason, child.stop_reason = upd.finish_reason, upd.stop_reason
                if hit is not None:
                    child.finish_reason, child.stop_reason = "stop", hit
            if child.finish_reason is not None:
                child.detok.flush()
                parent.num_finished += 1
                touched[parent.request_id] = parent
        outputs = [
            self._make_output(p) for p in touched.values()
            if not finished_only or p.num_finished == len(p.children)
        ]
        for p in touched.values():
            if p.num_finished == len(p.children):
                self.parents.pop(p.request_id, None)
                for cid in p.children:
                    self.child_to_parent.pop(cid, None)
        return outputs, to_stop

    def _add_prompt_logprobs(self, parent: _Parent, entries: list) -> None:
        out = parent.prompt_logprobs
        for entry in entries:
            if len(out) >= len(parent.prompt_token_ids):
                break  # recomputed after a preemption: already have these
            if entry is None:
                out.append(None)
                continue
            tok = parent.prompt_token_ids[len(out)]
            d, chosen_lp, rank = self._logprob_dict(entry)
            if tok not in d:
                d[tok] = Logprob(chosen_lp, rank)
            out.append(d)

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outs = []
        for child in sorted(parent.children.values(), key=lambda c: c.index):
            outs.append(
                CompletionOutput(
                    index=child.index,
                    text=child.detok.text,
                    token_ids=list(child.token_ids),
                    cumulative_logprob=child.cumulative_logprob,
                    logprobs=child.logprobs,
                    finish_reason=child.finish_reason,
                    stop_reason=child.stop_reason,
                )
            )
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=parent.num_finished == len(parent.children),
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
        )
