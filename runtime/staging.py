"""A step's host-to-device inputs through pinned memory, so that queueing them never waits for the GPU.

CUDA documents that an "async" copy from ordinary (pageable) host memory may synchronise with the stream
before it stages the bytes (the runtime API's "API synchronization behavior" notes); from pinned memory the
copy is queued and the call returns. With async scheduling a step's inputs are queued while the previous
step still runs, so they come from here. (Measured on two H200s in session 5: batch-1 decode at TP=1 and
TP=2 unchanged within the run-to-run spread; ``tests/test_staging.py`` checks on a GPU that staged copies
queue behind a busy stream.)

The pinned arena is split into ``depth`` regions used round-robin, one per step. A region is written again
only after an event recorded behind its step's copies has completed; with three regions and async
scheduling's one step in flight that wait is already over when it is asked. A step whose inputs do not fit
its region copies the rest from pageable memory (correct, only slower) and the regions grow before the next
step to twice what it needed. The arena is allocated at the first step, so a staging that is never used
costs nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger("pagedserve.staging")

_ALIGN = 64
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32,
                 torch.float64: np.float64, torch.bool: np.bool_, torch.int16: np.int16, torch.float16: np.float16,
                 torch.uint8: np.uint8, torch.int8: np.int8}


class HostStaging:
    def __init__(self, device: torch.device, region_bytes: int = 4 << 20, depth: int = 3) -> None:
        if region_bytes <= 0 or region_bytes % _ALIGN:
            raise ValueError(f"region_bytes must be a positive multiple of {_ALIGN}, got {region_bytes}")
        self.device = device
        self.enabled = device.type == "cuda"
        self.region_bytes = region_bytes
        self.depth = depth
        self._arena: torch.Tensor | None = None
        self._events: list[torch.cuda.Event | None] = [None] * depth
        self._region = -1
        self._offset = 0
        self._needed = 0  # bytes this step asked for, fallbacks included
        self.pageable_fallbacks = 0  # arrays that did not fit their step's region

    def begin_step(self) -> None:
        """Start a step: the previous step's copies are all queued, so an event recorded now follows them."""
        if not self.enabled:
            return
        if self._region >= 0:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[self._region] = event
        if self._arena is None or self._needed > self.region_bytes:
            self._grow()
        self._region = (self._region + 1) % self.depth
        waiting = self._events[self._region]
        if waiting is not None:
            waiting.synchronize()  # three steps ago: long done unless the queue is very deep
            self._events[self._region] = None
        self._offset = 0
        self._needed = 0

    def _grow(self) -> None:
        if self._arena is not None:
            size = -(-2 * self._needed // (1 << 20)) << 20
            logger.info("step inputs needed %d bytes of pinned staging; regions grow from %d to %d bytes",
                        self._needed, self.region_bytes, size)
            for event in self._events:  # every queued copy out of the old arena has to finish first
                if event is not None:
                    event.synchronize()
            self._events = [None] * self.depth
            self.region_bytes = size
        self._arena = torch.empty(self.depth * self.region_bytes, dtype=torch.uint8, pin_memory=True)

    def host(self, values, dtype: torch.dtype) -> torch.Tensor:
        """``values`` (an array or list) as a host tensor of ``dtype`` to copy from with ``non_blocking``: a
        view of this step's pinned region on CUDA, an ordinary tensor on CPU or before the first step."""
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is None:  # no numpy equivalent (bfloat16): an ordinary tensor
            return torch.as_tensor(np.asarray(values), dtype=dtype)
        arr = np.asarray(values, dtype=np_dtype)
        if not self.enabled or self._region < 0:
            return torch.from_numpy(np.ascontiguousarray(arr))
        size = -(-arr.nbytes // _ALIGN) * _ALIGN
        self._needed += size
        start = self._offset
        end = start + arr.nbytes
        if end > self.region_bytes:
            self.pageable_fallbacks += 1
            return torch.from_numpy(np.ascontiguousarray(arr))
        self._offset = start + size
        base = self._region * self.region_bytes
        pinned = self._arena[base + start:base + end].view(dtype).view(arr.shape)
        pinned.numpy()[...] = arr
        return pinned

    def to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a tensor on the device, queued without waiting for the GPU."""
        t = self.host(values, dtype)
        return t.to(self.device, non_blocking=True) if self.enabled else t
