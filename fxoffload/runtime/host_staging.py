"""Host staging: where a stored tensor's bytes wait in host memory, and how they go back.

``store`` copies the tensor into an aligned buffer the engine owns before it
returns (the compiler may reuse the tensor's memory right after), and the I/O
threads write from that buffer. One implementation per kind of device, so
that the engine's ``store`` and ``wait`` each have one path:

- ``PageableStaging`` (CPU, and any device but CUDA): a plain copy; the
  staging buffer itself can become the restored tensor, so forwarding (a
  ``wait`` before the write is done) waits for the write and hands it over.
- ``PinnedStaging`` (CUDA): the copy to pinned memory is queued on the
  caller's stream, and an event marks it done for the I/O threads; forwarding
  is a device copy of the buffer, queued after that event, without waiting
  for the write.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch

from fxoffload.runtime.staging import StagingPool


def view_as(
    buffer: torch.Tensor, shape: Sequence[int], dim_order: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """View the front of a uint8 buffer as a dense tensor with the given dim order."""
    physical = [shape[d] for d in dim_order]
    numel = 1
    for s in physical:
        numel *= s
    flat = buffer[: numel * dtype.itemsize].view(dtype)
    inverse = sorted(range(len(dim_order)), key=dim_order.__getitem__)
    return flat.view(physical).permute(inverse)


class HostStaging(abc.ABC):
    """How one kind of device's tensors are staged in host memory and restored."""

    pinned: bool
    """Its buffers are pinned (the pool keeps them apart)."""
    copies_out: bool
    """A forwarding ``wait`` gets a device copy of the buffer at once, rather than the
    buffer itself once it is written (:meth:`forward`)."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool

    @abc.abstractmethod
    def copy_in(
        self, t: torch.Tensor, dim_order: Sequence[int]
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A uint8 buffer holding ``t`` laid out in ``dim_order``, and the event that marks
        the copy done (None: done on return)."""

    @abc.abstractmethod
    def read_buffer(self, nbytes: int) -> torch.Tensor:
        """A buffer for a read of ``nbytes`` to land in."""

    @abc.abstractmethod
    def to_device(self, restored: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The restored host tensor on the stored tensor's device."""

    @abc.abstractmethod
    def forward(
        self,
        staged: torch.Tensor,
        copied: torch.cuda.Event | None,
        device: torch.device,
        written: Callable[[], None],
    ) -> torch.Tensor:
        """The stored tensor from its staging bytes ``staged`` (viewed in its layout), whose
        writes may not have ended; ``written()`` waits for them, raising if one failed."""

    def reusable(self, copied: torch.cuda.Event | None) -> bool:
        """Whether a buffer whose write has settled may stage another store."""
        return True


class PageableStaging(HostStaging):
    pinned = False
    copies_out = False

    def copy_in(
        self, t: torch.Tensor, dim_order: Sequence[int]
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        buffer = self.pool.take(t.numel() * t.element_size(), pin_memory=False)
        view_as(buffer, t.shape, dim_order, t.dtype).copy_(t)
        return buffer, None

    def read_buffer(self, nbytes: int) -> torch.Tensor:
        return self.pool.take_returning(nbytes)

    def to_device(self, restored: torch.Tensor, device: torch.device) -> torch.Tensor:
        return restored if device.type == "cpu" else restored.to(device, non_blocking=True)

    def forward(self, staged, copied, device, written) -> torch.Tensor:
        written()  # the buffer becomes the tensor: no write may still read it
        return self.to_device(staged, device)


class PinnedStaging(HostStaging):
    pinned = True
    copies_out = True

    def copy_in(
        self, t: torch.Tensor, dim_order: Sequence[int]
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        buffer = self.pool.take(t.numel() * t.element_size(), pin_memory=True)
        view_as(buffer, t.shape, dim_order, t.dtype).copy_(t, non_blocking=True)
        copied = torch.cuda.Event(blocking=True)  # I/O threads sleep in synchronize()
        copied.record(torch.cuda.current_stream(t.device))  # where copy_ ran
        return buffer, copied

    def read_buffer(self, nbytes: int) -> torch.Tensor:
        return self.pool.take(nbytes, pin_memory=True)

    def to_device(self, restored: torch.Tensor, device: torch.device) -> torch.Tensor:
        return restored.to(device, non_blocking=True)

    def forward(self, staged, copied, device, written) -> torch.Tensor:
        """A device copy of ``staged``, queued on the current stream after the copy into it.

        It leaves the buffer as it is, so it need not wait for the writes (the
        host runs ahead of the device: backward often waits before they start).
        """
        assert copied is not None
        torch.cuda.current_stream(device).wait_event(copied)
        return staged.to(device, non_blocking=True)

    def reusable(self, copied: torch.cuda.Event | None) -> bool:
        # A write cancelled before a chunk waited for the copy into the buffer, which may
        # still be queued: the caching host allocator, which tracks that copy, gets it
        # back instead of a read that the copy would overwrite.
        return copied is not None and copied.query()
