"""The offline API, compatible with vLLM's: ``LLM(model).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from typing import Any

from pagedserve.runtime.engine import EngineArgs, EngineCore
from pagedserve.runtime.output_processor import OutputProcessor, child_request_id
from pagedserve.runtime.outputs import RequestOutput
from pagedserve.runtime.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    """An engine for offline batch generation.

    ``LLM(model, tensor_parallel_size=1, dtype="auto", max_model_len=None, gpu_memory_utilization=0.9,
    enable_prefix_caching=True, seed=0, ...)``; ``model`` is a Hugging Face model directory or a GGUF file.
    """

    def __init__(self, model: str | os.PathLike, **kwargs: Any) -> None:
        self.engine_args = EngineArgs.from_kwargs(os.fspath(model), **kwargs)
        self.engine = EngineCore(self.engine_args)
        self.tokenizer = self.engine.source.tokenizer
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.last_stats: dict[str, float] = {}
        self.record_step_times = False
        self.step_times: list | None = None

    def get_tokenizer(self):
        return self.tokenizer

    # ----------------------------------------------------------------------------- generate
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: {len(params_list)} given for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority: {len(priority)} given for {len(prompts)} prompts")
        # Validate everything before adding anything, so a bad prompt leaves nothing half-submitted.
        prepared = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
            text, ids = self._tokenize(prompt)
            self.engine.check_structured_outputs(params)
            rid = str(next(self._ids))
            reqs = [
                self.engine.make_request(
                    child_request_id(rid, j, params.n), ids, self._child_params(params, j),
                    priority[i] if priority else 0,
                )
                for j in range(params.n)
            ]
            prepared.append((rid, text, ids, params, reqs))
        order = [rid for rid, *_ in prepared]
        for rid, text, ids, params, reqs in prepared:
            self.processor.add_request(rid, text, ids, params)
            for req in reqs:
                self.engine.add_request(req)
        return self._run(order)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            ids = self.tokenizer.apply_chat_template(
                conv, tokenize=True, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params)

    # ----------------------------------------------------------------------------- internals
    @staticmethod
    def _child_params(params: SamplingParams, index: int) -> SamplingParams:
        if params.n == 1:
            return params
        seed = None if params.seed is None else params.seed + index
        return params.clone(n=1, seed=seed)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids: must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return prompt["prompt"], list(self.tokenizer(prompt["prompt"])["input_ids"])
        raise ValueError("prompt: must be a string or a dict with 'prompt' or 'prompt_token_ids'")

    def _run(self, order: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        engine, processor = self.engine, self.processor
        t0 = time.perf_counter()
        steps = 0
        num_out = 0
        step_times = self.step_times = [] if self.record_step_times else None
        while engine.has_unfinished():
            ts = time.perf_counter()
            updates = engine.step()
            steps += 1
            if step_times is not None:
                step_times.append((time.perf_counter() - ts, *engine.last_step_shape))
            outputs, to_stop = processor.process(updates, finished_only=True)
            if to_stop:
                engine.finish_requests(to_stop)
            for out in outputs:
                if out.finished:
                    final[out.request_id] = out
                    num_out += sum(len(o.token_ids) for o in out.outputs)
        elapsed = time.perf_counter() - t0
        self.last_stats = {"elapsed_s": elapsed, "steps": steps, "output_tokens": num_out,
                           "output_tokens_per_s": num_out / elapsed if elapsed > 0 else 0.0}
        return [final[rid] for rid in order]
