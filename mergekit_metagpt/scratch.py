"""Reusable float32 work buffers.

A fresh multi-megabyte allocation per tensor costs page faults on every first touch
(on CPU it was 6x slower than the arithmetic itself), so the pre-pass and the merge
work in buffers that grow to the largest tensor seen and are then reused. Buffers are
per thread (mergekit's multi-GPU executor merges from several threads) and per device.
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

    def get(self, slot: str, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised buffer of `like`'s shape on its device, reused per slot."""
        return self.flat(slot, like.numel(), like.device, dtype).view(like.shape)

    def flat(self, slot: str, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (slot, device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]

    def clear(self) -> None:
        self._buffers.clear()


def thread_scratch() -> Scratch:
    """The calling thread's buffers (kept for the thread's next tensors)."""
    scratch = getattr(_LOCAL, "scratch", None)
    if scratch is None:
        scratch = _LOCAL.scratch = Scratch()
    return scratch
