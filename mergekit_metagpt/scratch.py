"""Reusable work buffers (float32; float64 for float64 tensors), one chunk in size.

A fresh multi-megabyte allocation per tensor costs page faults on every first touch
(on CPU it was 6x slower than the arithmetic itself), so the pre-pass and the merge
work chunk by chunk in buffers that are then reused: a few buffers of one chunk (2 MiB
on CPU, 16 MiB on a GPU) per thread (mergekit's multi-GPU executor merges from several
threads) and per device.
"""

from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch

_LOCAL = threading.local()

# Elements per chunk: float32 work memory stays at a few chunks, however large the
# tensor (a 7B model's embedding is 131M elements). On CPU, 2 MiB chunks: the few
# buffers of one chunk stay in the processor's cache between the passes over them
# (measured: the pre-pass's arithmetic 1.3-1.6x faster than with 16 MiB); on a GPU, 16 MiB
# (fewer kernel launches).
CHUNK = 4 * 1024 * 1024
CPU_CHUNK = 512 * 1024


def chunks(numel: int, device: torch.device):
    """(start, end) ranges covering a flattened tensor: CPU_CHUNK elements each on the
    CPU, CHUNK elsewhere."""
    size = CPU_CHUNK if torch.device(device).type == "cpu" else CHUNK
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


class Scratch:
    def __init__(self):
        self._buffers: Dict[Tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def flat(self, slot: str, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised 1-d buffer of `numel` elements, reused per slot."""
        key = (slot, device, dtype)
        buffer = self._buffers.get(key)
        # one made under torch.inference_mode() cannot be written outside it (and one
        # written with autograd on would carry its graph): made again
        if buffer is not None and ((buffer.is_inference() and not torch.is_inference_mode_enabled())
                                   or buffer.requires_grad or buffer.grad_fn is not None):
            buffer = None
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


def release_thread_scratch() -> None:
    """Drop the calling thread's buffers when its merge ends, so that a process that goes
    on (a notebook, a pipeline) holds none of them: on CPU their memory is freed; on a GPU
    it goes back to PyTorch's caching allocator, as mergekit's own tensors do
    (``torch.cuda.empty_cache()`` hands it to the driver). Other threads' buffers go with
    their threads."""
    _LOCAL.__dict__.pop("scratch", None)
