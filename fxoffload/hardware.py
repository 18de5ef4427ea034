"""Hardware records for the simulator: the rates a plan is made with, for machines we don't have.

Presets hold each accelerator's datasheet peaks (SXM parts; dense rates, not the
doubled "with sparsity" figures):

- H100: NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 989 TFLOPS, TF32
  494.5 TFLOPS, HBM3 3.35 TB/s, PCIe Gen5 128 GB/s (both directions together).
- H200: NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 989 TFLOPS, TF32
  494.5 TFLOPS, HBM3e 4.8 TB/s, PCIe Gen5 128 GB/s.
- A100: NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS, TF32
  156 TFLOPS, HBM2e 2.039 TB/s, PCIe Gen4 64 GB/s.

PCIe is planned per direction (half the datasheet figure): offloading moves bytes
one way at a time. Peaks are upper bounds that training does not reach (a
model's FLOP utilization is typically 40-60%), so with these figures compute
looks shorter than it is and the simulator hides less I/O than a real step
could; give measured rates where you have them. Presets carry no drives: every
machine's are its own.
"""

from __future__ import annotations

import dataclasses

from fxoffload.passes.costs import DeviceCosts


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator and the drives behind it, in bytes and FLOPs per second.

    The planner writes to all drives at once, so it plans with their summed rate;
    every byte written also crosses the accelerator's PCIe link (``store``'s copy
    into host staging), which caps that sum and sets the copy's rate.
    """

    name: str
    flops_per_s: float
    """Dense bfloat16/float16 tensor rate."""
    memory_bytes_per_s: float
    disk_write_bytes_per_s: tuple[float, ...] = ()
    """One entry per drive."""
    disk_read_bytes_per_s: tuple[float, ...] | None = None
    """One entry per drive; ``None``: the write rates."""
    pcie_bytes_per_s: float | None = None
    """One direction; ``None``: no cap, and the staging copy runs at half the memory
    bandwidth (a CPU device, whose staging is a memory copy)."""
    flops_per_s_32bit: float | None = None
    """The float32 matmul rate (TF32 on these parts); ``None``: ``flops_per_s`` for every dtype."""

    def __post_init__(self) -> None:
        reads = self.disk_read_bytes_per_s
        rates = [self.flops_per_s, self.memory_bytes_per_s, *self.disk_write_bytes_per_s]
        rates += [*(reads or ()), self.pcie_bytes_per_s or 1.0, self.flops_per_s_32bit or 1.0]
        if any(not rate > 0 for rate in rates):
            raise ValueError(f"hardware {self.name!r}: every rate must be > 0")
        if reads is not None and len(reads) != len(self.disk_write_bytes_per_s):
            raise ValueError(
                f"hardware {self.name!r}: {len(reads)} read rates for "
                f"{len(self.disk_write_bytes_per_s)} drives"
            )

    @property
    def write_bytes_per_s(self) -> float:
        """The drives' summed write rate, capped by PCIe."""
        return self._capped(sum(self.disk_write_bytes_per_s))

    @property
    def read_bytes_per_s(self) -> float:
        """The drives' summed read rate, capped by PCIe."""
        reads = self.disk_read_bytes_per_s or self.disk_write_bytes_per_s
        return self._capped(sum(reads))

    def write_shares(self) -> tuple[float, ...]:
        """The fraction of the bytes written that each drive takes: its share of the rate."""
        total = sum(self.disk_write_bytes_per_s)
        return tuple(rate / total for rate in self.disk_write_bytes_per_s)

    def device_costs(self) -> DeviceCosts:
        """The cost model's rates: those the backend would use, measured, on this machine."""
        if not self.disk_write_bytes_per_s:
            raise ValueError(f"hardware {self.name!r} has no drives: give their rates")
        return DeviceCosts(
            flops_per_s=self.flops_per_s_32bit or self.flops_per_s,
            memory_bytes_per_s=self.memory_bytes_per_s,
            write_bytes_per_s=self.write_bytes_per_s,
            read_bytes_per_s=self.read_bytes_per_s,
            flops_per_s_16bit=self.flops_per_s if self.flops_per_s_32bit else None,
            copy_bytes_per_s=self.pcie_bytes_per_s,
        )

    def _capped(self, rate: float) -> float:
        return rate if self.pcie_bytes_per_s is None else min(rate, self.pcie_bytes_per_s)


PRESETS: dict[str, Hardware] = {
    "h100": Hardware("h100", 989e12, 3.35e12, pcie_bytes_per_s=64e9, flops_per_s_32bit=494.5e12),
    "h200": Hardware("h200", 989e12, 4.8e12, pcie_bytes_per_s=64e9, flops_per_s_32bit=494.5e12),
    "a100": Hardware("a100", 312e12, 2.039e12, pcie_bytes_per_s=32e9, flops_per_s_32bit=156e12),
}
"""Datasheet figures (see the module docstring), without drives."""


def preset(name: str, **overrides: object) -> Hardware:
    """A preset with any of its fields replaced.

    For example ``preset("h100", disk_write_bytes_per_s=(7e9, 7e9))``: an H100 with two drives.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
