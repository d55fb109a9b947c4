"""A step's host-to-device inputs through pinned memory, so that launching them never waits for the GPU.

``tensor.to("cuda", non_blocking=True)`` from ordinary (pageable) host memory is not asynchronous in
practice: the driver stages the bytes and the call returns only once the stream has reached the copy. With
async scheduling a decode step is launched while the previous one still runs, so its first input copy held
the host until the GPU had finished that step, and every later copy of the step then reached an idle GPU one
at a time (a profile of batch-1 decode at TP=2 on two H200s: ~0.3 ms of idle GPU per 3 ms step, all of it in
gaps between the step's input copies; bench/profile_tp.py). From pinned memory the copies are queued at once.

The pinned arena is split into ``depth`` regions used round-robin, one per step. A region is written again
only after an event recorded behind its step's copies has completed; with three regions and async
scheduling's one step in flight that wait is already over when it is asked. A step whose inputs do not fit
its region (a very large prefill) copies the rest from pageable memory, which is correct, only slower.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64


class HostStaging:
    def __init__(self, device: torch.device, region_bytes: int = 4 << 20, depth: int = 3) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self.region_bytes = region_bytes
        self.depth = depth
        self._arena = (torch.empty(depth * region_bytes, dtype=torch.uint8, pin_memory=True)
                       if self.enabled else None)
        self._events: list[torch.cuda.Event | None] = [None] * depth
        self._region = -1
        self._offset = 0
        self.pageable_fallbacks = 0  # steps' arrays that did not fit their region (for tests and tuning)

    def begin_step(self) -> None:
        """Start a step: the previous step's copies are all queued, so an event recorded now follows them."""
        if not self.enabled:
            return
        if self._region >= 0:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[self._region] = event
        self._region = (self._region + 1) % self.depth
        waiting = self._events[self._region]
        if waiting is not None:
            waiting.synchronize()  # three steps ago: long done unless the queue is very deep
            self._events[self._region] = None
        self._offset = 0

    def host(self, values, dtype: torch.dtype) -> torch.Tensor:
        """``values`` (an array or list) as a host tensor of ``dtype`` to copy from with ``non_blocking``: a
        view of this step's pinned region on CUDA, an ordinary tensor on CPU."""
        arr = np.asarray(values, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        if not self.enabled or self._region < 0:
            return torch.from_numpy(np.ascontiguousarray(arr))
        start = -(-self._offset // _ALIGN) * _ALIGN
        end = start + arr.nbytes
        if end > self.region_bytes:
            self.pageable_fallbacks += 1
            return torch.from_numpy(np.ascontiguousarray(arr))
        self._offset = end
        base = self._region * self.region_bytes
        pinned = self._arena[base + start:base + end].view(dtype).view(arr.shape)
        pinned.numpy()[...] = arr
        return pinned

    def to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a tensor on the device, copied without waiting for the GPU."""
        t = self.host(values, dtype)
        return t.to(self.device, non_blocking=True) if self.enabled else t
