"""Host-to-GPU copies of mapped checkpoint tensors through a ring of pinned buffers.

A plain ``tensor.to("cuda")`` of a memory-mapped tensor is a pageable copy: the host
thread faults the pages in, the driver stages them, and the host waits for the copy to
finish before it reads the next tensor. Here each tensor goes over in chunks: the host
copies a chunk from the mapped file into a pinned buffer and queues its transfer
(non-blocking), then goes on to the next chunk while the GPU's copy engine moves the
previous one, so reading the file overlaps the transfers and the GPU arithmetic of
earlier tensors. Host memory: ``SLOTS`` pinned buffers of ``CHUNK_BYTES``, whatever
the tensor's size, each allocated when first used (with ``--read-to-gpu`` no tensor
comes through here, and nothing is pinned).
"""

from __future__ import annotations

from typing import List, Optional

import torch

CHUNK_BYTES = 32 * 2**20
SLOTS = 4


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """A pinned host buffer of `nbytes` bytes. On the CPU by name: mergekit's
    ``--multi-gpu`` runs each worker under ``with torch.device(gpu)``, which would
    otherwise make it a GPU tensor, which cannot be pinned (CUDA raises)."""
    return torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)


class PinnedStaging:
    """Copies CPU tensors to one CUDA device, chunk by chunk, through pinned buffers."""

    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES, slots: int = SLOTS):
        self.device = device
        self.chunk_bytes = chunk_bytes
        self._buffers: List[Optional[torch.Tensor]] = [None] * slots  # pinned when first used
        self._events: List[Optional[torch.cuda.Event]] = [None] * slots
        self._next = 0

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (on the CPU) as a new tensor on the device. The copy is queued on the
        current stream: work queued after it on that stream sees the data."""
        source = tensor.contiguous().reshape(-1).view(torch.uint8)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        target = out.reshape(-1).view(torch.uint8)
        for start in range(0, source.numel(), self.chunk_bytes):
            end = min(start + self.chunk_bytes, source.numel())
            slot = self._next
            self._next = (slot + 1) % len(self._buffers)
            if self._events[slot] is not None:
                self._events[slot].synchronize()  # its previous transfer has left the buffer
            if self._buffers[slot] is None:
                self._buffers[slot] = pinned_buffer(self.chunk_bytes)
            buffer = self._buffers[slot][: end - start]
            buffer.copy_(source[start:end])
            target[start:end].copy_(buffer, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the stream the copy went on
            self._events[slot] = event
        return out

    def close(self) -> None:
        """Wait for the queued transfers, then let the buffers go (back to torch's pinned-memory
        cache, which keeps them for the process's next pass)."""
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._buffers, self._events = [], []
