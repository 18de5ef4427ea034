"""How much memory a training step holds: RSS on the CPU, allocated bytes on CUDA.

On CPU, RSS follows the live bytes only when glibc unmaps freed tensors, so a
child process runs with ``MMAP_ENV`` (every allocation of 64 KiB and up is
mmapped, and unmapped when freed); ``trim_heap`` before a measured step
returns freed heap memory, and ``restore_malloc_defaults`` puts the thresholds
back near glibc's own before timing, since mapping fresh pages for every
tensor is slow on a VM.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import torch

import fxoffload

MiB = 1 << 20
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
libc = ctypes.CDLL(None)


def exact_rss() -> bool:
    """Whether this process runs with ``MMAP_ENV`` under glibc: RSS follows the live bytes."""
    return os.environ.get("MALLOC_MMAP_THRESHOLD_") == "65536" and hasattr(libc, "mallopt")


def trim_heap() -> None:
    """Return heap memory freed earlier to the OS (glibc's ``malloc_trim``)."""
    libc.malloc_trim(0)


def restore_malloc_defaults() -> None:
    """About glibc's default thresholds: reuse freed memory up to 32 MiB."""
    libc.mallopt(M_MMAP_THRESHOLD, 32 * MiB)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * MiB)


class Sampler(threading.Thread):
    """Calls ``read()`` about every millisecond until stopped: [(perf_counter, bytes)]."""

    def __init__(self, read) -> None:
        super().__init__(daemon=True)
        self.read, self.samples, self.done = read, [], threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            time.sleep(0.001)

    def stop(self) -> list[tuple[float, int]]:
        self.done.set()
        self.join()
        return self.samples


def vm_status(key: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key + ":")).split()[1]) * 1024


class Meter:
    """Bytes in use now, and the peak since ``reset_peak``: RSS on CPU, allocated on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.sampler = device.type == "cuda", None
        self.hwm = not self.cuda and self._clear_refs_works()
        self.method = (
            "cuda max_memory_allocated" if self.cuda
            else "VmHWM after clear_refs" if self.hwm
            else "VmRSS sampled every 1 ms (clear_refs does not reset VmHWM here)"
        )  # fmt: skip

    def _clear_refs_works(self) -> bool:
        torch.ones(64 * MiB // 4)  # VmHWM now >= 64 MiB above VmRSS
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return vm_status("VmHWM") - vm_status("VmRSS") < 16 * MiB

    def now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def baseline(self) -> int:
        """What a step's memory is measured above: in use now, less offloading's idle buffers.

        On CPU the engine keeps staging and read buffers between steps (up to
        ``staging_pool_bytes``) and a step takes its buffers from them, so a
        peak taken above the RSS alone would leave that memory out.
        """
        return self.now() - (0 if self.cuda else fxoffload.stats().staging_bytes_held)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self.sampler = Sampler(self.now)

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return vm_status("VmHWM") if self.hwm else max(b for _, b in self.sampler.stop())
