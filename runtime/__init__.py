"""pagedserve runtime: the paged-attention inference engine and its server.

``from pagedserve.runtime import LLM, SamplingParams`` mirrors vLLM's offline API.
"""

from pagedserve.runtime.llm import LLM
from pagedserve.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
