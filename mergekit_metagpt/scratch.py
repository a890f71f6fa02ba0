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


class Scratch:
    def __init__(self):
        self._buffers: Dict[Tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, slot: str, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised buffer of `like`'s shape on its device, reused per slot."""
        key = (slot, like.device, dtype)
        buffer = self._buffers.get(key)
        numel = like.numel()
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)
            buffer = torch.empty(numel, dtype=dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[:numel].view(like.shape)

    def clear(self) -> None:
        self._buffers.clear()


def thread_scratch() -> Scratch:
    """The calling thread's buffers (kept for the thread's next tensors)."""
    scratch = getattr(_LOCAL, "scratch", None)
    if scratch is None:
        scratch = _LOCAL.scratch = Scratch()
    return scratch
