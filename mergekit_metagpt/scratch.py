"""Reusable float32 work buffers, one chunk in size.

A fresh multi-megabyte allocation per tensor costs page faults on every first touch
(on CPU it was 6x slower than the arithmetic itself), so the pre-pass and the merge
work chunk by chunk in buffers that are then reused: a few 16 MiB buffers per thread
(mergekit's multi-GPU executor merges from several threads) and per device.
"""

from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch

_LOCAL = threading.local()

# Elements per chunk: float32 work memory stays at a few chunks of 16 MiB, however
# large the tensor (a 7B model's embedding is 131M elements).
CHUNK = 4 * 1024 * 1024


def chunks(numel: int, size: int = CHUNK):
    """(start, end) ranges covering a flattened tensor."""
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


class Scratch:
    def __init__(self):
        self._buffers: Dict[Tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def flat(self, slot: str, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised 1-d buffer of `numel` elements, reused per slot."""
        key = (slot, device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]


def thread_scratch() -> Scratch:
    """The calling thread's buffers (kept for the thread's next tensors)."""
    scratch = getattr(_LOCAL, "scratch", None)
    if scratch is None:
        scratch = _LOCAL.scratch = Scratch()
    return scratch
