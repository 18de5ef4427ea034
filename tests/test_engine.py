"""The engine on its own: a real file, real worker threads, no compiler."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import warnings
import weakref

import pytest
import torch
from engine_helpers import block_io_thread, slots_freed, written

import fxoffload
from fxoffload.runtime import Engine, EngineConfig
from fxoffload.runtime.engine import EntryState
from fxoffload.runtime.offload_file import ALIGNMENT, HUGE_PAGE, aligned_buffer


@pytest.fixture
def make_engine(tmp_path):
    made = []

    def make(root=tmp_path, **config) -> Engine:
        engine = Engine(str(root), EngineConfig(**{"io_threads": 1, **config}))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def delta(before: fxoffload.OffloadStats, field: str) -> int:
    return getattr(fxoffload.stats(), field) - getattr(before, field)


TENSORS = {
    "bool": lambda: torch.rand(7, 13) > 0.5,
    "int8-odd": lambda: torch.randint(-128, 127, (1001,), dtype=torch.int8),
    "bf16": lambda: torch.randn(3, 5, 17, dtype=torch.bfloat16),
    "fp64-transposed": lambda: torch.randn(33, 9, dtype=torch.float64).t(),
    "complex-permuted": lambda: torch.randn(4, 6, 5, dtype=torch.complex64).permute(2, 0, 1),
    "size1-dim": lambda: torch.randn(2, 1, 5)[:, :, 1:4].contiguous(),
    "empty": lambda: torch.randn(0, 3),
    "multi-chunk-odd": lambda: torch.randn(3 * 1024 + 7),
}


@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
@pytest.mark.parametrize("name", list(TENSORS))
def test_round_trip_is_exact(make_engine, name: str, io_mode: str) -> None:
    try:
        engine = make_engine(io_mode=io_mode, chunk_bytes=4096, io_threads=4)
    except ValueError as e:
        pytest.skip(f"this file system refuses O_DIRECT: {e}")
    t = TENSORS[name]()
    before = fxoffload.stats()
    handle = engine.store(t)
    written(engine)
    out = engine.wait(handle)
    assert delta(before, "bytes_read") >= t.numel() * t.element_size()
    assert out.dtype == t.dtype and out.shape == t.shape and out.stride() == t.stride()
    assert out.storage_offset() == 0  # inductor addresses buffers from their storage's start
    assert torch.equal(out, t)
    del handle
    gc.collect()
    assert engine.live_entries() == 0 and engine.drives[0].file.bytes_in_use == 0


@pytest.fixture
def ramfs(tmp_path):
    """A file system without O_DIRECT (ramfs), mounted for the test when it may be."""
    path = tmp_path / "ramfs"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount ramfs here: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_direct_io_falls_back_to_buffered_without_o_direct(ramfs, make_engine) -> None:
    engine = make_engine(root=ramfs)
    assert not engine.drives[0].file.direct
    t = torch.randn(1000)
    handle = engine.store(t)
    written(engine)
    assert torch.equal(engine.wait(handle), t)
    del handle
    with pytest.raises(ValueError, match=f"cannot use direct I/O in offload_dir '{ramfs}'"):
        make_engine(root=ramfs, io_mode="direct")


def test_wait_twice_reads_the_slot_twice(make_engine) -> None:
    engine = make_engine()
    t = torch.randn(256, 256)
    handle = engine.store(t)
    written(engine)
    before = fxoffload.stats()
    engine.prefetch(handle)
    first = engine.wait(handle)
    first.zero_()  # backward may reuse what wait returned; the file must not care
    assert torch.equal(engine.wait(handle), t)
    assert delta(before, "bytes_read") == 2 * t.numel() * 4
    assert delta(before, "tensors_forwarded") == 0


def test_wait_before_the_write_finishes_forwards_from_memory(make_engine) -> None:
    engine = make_engine()
    t = torch.randn(64, 64)
    gate = block_io_thread(engine)
    handle = engine.store(t)
    engine.prefetch(handle)  # still in memory: nothing to read
    before = fxoffload.stats()
    result: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: result.append(engine.wait(handle)))
    waiter.start()
    time.sleep(0.05)
    assert not result  # wait holds the bytes back until the write is done
    gate.set()
    waiter.join(timeout=10)
    assert torch.equal(result[0], t)
    assert delta(before, "tensors_forwarded") == 1
    assert delta(before, "bytes_read") == 0
    result[0].zero_()
    # The slot is complete, so a second wait (retain_graph) reads it.
    assert torch.equal(engine.wait(handle), t)


def test_staging_buffers_are_reused_within_the_cap(make_engine) -> None:
    size = 64 * 1024  # bytes of one 128x128 float32
    engine = make_engine(staging_pool_bytes=2 * size)
    before = fxoffload.stats()
    tensors = [torch.randn(128, 128) for _ in range(8)]
    handles = []
    for t in tensors:
        handles.append(engine.store(t))
        written(engine)  # its buffer goes back to the pool...
    # ...so every store after the first copied into the first one's buffer.
    assert delta(before, "staging_reused") == len(tensors) - 1
    assert all(torch.equal(engine.wait(h), t) for h, t in zip(handles, tensors, strict=True))
    # Four stores in flight at once: all four buffers come back, two fit the cap.
    gate = block_io_thread(engine)
    more = [engine.store(t) for t in tensors[:4]]
    gate.set()
    written(engine)
    assert engine.staging_bytes_held == 2 * size
    del more


def test_read_buffer_returns_to_the_pool_only_when_the_restored_tensor_dies(make_engine) -> None:
    size = 64 * 1024
    engine = make_engine(staging_pool_bytes=size)  # room for one buffer
    t, u = torch.randn(128, 128), torch.randn(128, 128)
    handle = engine.store(t)
    written(engine)  # t's staging buffer is pooled...
    restored = engine.wait(handle)  # ...and the read takes it
    assert engine.staging_bytes_held == 0
    before = fxoffload.stats()
    engine.store(u)
    written(engine)
    assert delta(before, "staging_reused") == 0  # restored still uses it
    assert torch.equal(restored, t)
    engine._staging.clear()
    del restored
    gc.collect()
    assert engine.staging_bytes_held == size  # back once the tensor died
    engine.store(u)
    assert delta(before, "staging_reused") == 1


def vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping holding ``address`` (``VmFlags`` in smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's smaps")
def test_buffers_of_a_huge_page_and_up_ask_for_huge_pages() -> None:
    """Fresh staging and read buffers fault in 2 MiB at a time (see ``aligned_buffer``)."""
    large = aligned_buffer(HUGE_PAGE, populate=True)
    small = aligned_buffer(HUGE_PAGE - ALIGNMENT, populate=True)
    assert "hg" in vm_flags(large.data_ptr())  # MADV_HUGEPAGE
    assert "hg" not in vm_flags(small.data_ptr())
    assert not large.any() and not small.any()


def resident_anonymous_bytes() -> int:
    with open("/proc/self/status") as f:
        (kib,) = [line.split()[1] for line in f if line.startswith("RssAnon:")]
    return int(kib) * 1024


def test_staging_copy_is_freed_once_written(make_engine) -> None:
    """The memory saving itself: after its write, a stored tensor's bytes live only on disk."""
    engine = make_engine(staging_pool_bytes=0)
    size = 128 << 20
    t = torch.ones(size // 4)
    base = resident_anonymous_bytes() - size  # without t
    handle = engine.store(t)
    del t
    written(engine)
    assert resident_anonymous_bytes() - base < size // 4  # neither t nor its staging copy
    assert torch.equal(engine.wait(handle), torch.ones(size // 4))


def test_forwarded_staging_buffer_is_never_reused(make_engine) -> None:
    """A wait that takes the staging copy hands it to the caller: the pool must not get it."""
    engine = make_engine()
    a, b = torch.full((128, 128), 1.0), torch.full((128, 128), 2.0)
    gate = block_io_thread(engine)
    handle = engine.store(a)
    result: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: result.append(engine.wait(handle)))
    waiter.start()
    time.sleep(0.05)
    gate.set()
    waiter.join(timeout=10)
    written(engine)
    engine.store(b)  # same size: would reuse a's buffer if the pool had it
    written(engine)
    assert torch.equal(result[0], a)


def test_handle_freed_before_its_write_frees_the_slot(make_engine) -> None:
    engine = make_engine()
    gate = block_io_thread(engine)
    before = fxoffload.stats()
    handle = engine.store(torch.randn(1000))
    del handle
    gc.collect()
    gate.set()
    written(engine)
    assert engine.live_entries() == 0
    slots_freed(engine)
    assert delta(before, "bytes_written") == 0  # the queued write was cancelled


def test_inflight_cap_makes_store_wait(make_engine) -> None:
    cap = 64 * 1024
    engine = make_engine(max_inflight_bytes=cap)
    gate = block_io_thread(engine)
    first = torch.randn(12 * 1024)  # 48 KiB
    second = torch.randn(12 * 1024)
    before = fxoffload.stats()
    handles = [engine.store(first)]
    assert engine.inflight_bytes == 48 * 1024
    storer = threading.Thread(target=lambda: handles.append(engine.store(second)))
    storer.start()
    time.sleep(0.05)
    assert len(handles) == 1 and engine.inflight_bytes <= cap  # the second store waits
    gate.set()
    storer.join(timeout=10)
    assert len(handles) == 2 and delta(before, "store_waits") == 1
    assert delta(before, "store_wait_ns") > 0
    written(engine)
    assert torch.equal(engine.wait(handles[1]), second)


def test_wait_counts_a_stall_only_when_its_read_is_not_done(make_engine) -> None:
    engine = make_engine()
    tensors = [torch.randn(1000), torch.randn(1000)]
    hidden, exposed = (engine.store(t) for t in tensors)
    written(engine)
    engine.prefetch(hidden)
    engine.drives[0].pool.submit(lambda: None).result()  # the one I/O thread ran the read first
    before = fxoffload.stats()
    assert torch.equal(engine.wait(hidden), tensors[0])
    assert delta(before, "wait_stalls") == 0 and delta(before, "wait_stall_ns") == 0

    gate = block_io_thread(engine)
    engine.prefetch(exposed)
    threading.Timer(0.05, gate.set).start()
    assert torch.equal(engine.wait(exposed), tensors[1])
    assert delta(before, "wait_stalls") == 1
    assert delta(before, "wait_stall_ns") >= 40_000_000  # blocked until the gate opened


def test_same_tensor_stored_again_after_an_unversioned_write_keeps_both(make_engine) -> None:
    """Inductor reuses a dead buffer in place without bumping its version counter:
    a second store of the same tensor object may hold other bytes."""
    engine = make_engine()
    t = torch.randn(100, 100)
    first = t.clone()
    a = engine.store(t)
    t.data.add_(1)  # like a compiled kernel: new bytes, same tensor, same _version
    b = engine.store(t)
    written(engine)
    assert torch.equal(engine.wait(a), first)
    assert torch.equal(engine.wait(b), t)


def test_slots_are_reused_across_steps(make_engine) -> None:
    engine = make_engine(io_threads=2)
    sizes = [(64, 100), (7, 3), (512, 33), (1,)]
    sizes_seen = []
    for _ in range(200):
        handles = [engine.store(torch.randn(s)) for s in sizes]
        for h in reversed(handles):
            engine.prefetch(h)
            engine.wait(h)
        del handles, h  # refcounting frees the handles at once
        sizes_seen.append(engine.drives[0].file.size)
    assert engine.drives[0].file.bytes_in_use == 0
    assert len(set(sizes_seen)) == 1


def test_failed_write_keeps_the_tensor_in_memory(tiny_tmpfs, make_engine) -> None:
    engine = make_engine(root=tiny_tmpfs)
    small, big = torch.randn(10), torch.randn(64, 1024)  # 256 KiB: no room
    kept = engine.store(small)
    written(engine)
    before = fxoffload.stats()
    with pytest.warns(RuntimeWarning, match="keeping the tensor in memory instead"):
        handle = engine.store(big)
        written(engine)
    assert delta(before, "io_errors") == 1
    assert engine._entry(handle).state is EntryState.FAILED
    first = engine.wait(handle)
    first.zero_()
    assert torch.equal(engine.wait(handle), big)
    assert torch.equal(engine.wait(kept), small)


def test_truncated_file_is_an_error_not_wrong_data(make_engine) -> None:
    engine = make_engine()
    handle = engine.store(torch.randn(100))
    written(engine)
    os.truncate(engine.drives[0].file.path, 0)
    with pytest.raises(
        RuntimeError, match=f"cannot read back offloaded tensor .* in {engine.drives[0].file.path}"
    ):
        engine.wait(handle)


def test_overwritten_bytes_fail_their_checksum(make_engine) -> None:
    engine = make_engine(chunk_bytes=4096)
    handle = engine.store(torch.randn(3000))
    written(engine)
    with open(engine.drives[0].file.path, "r+b") as f:
        f.seek(5000)
        f.write(b"\x01")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        engine.wait(handle)


def test_raise_mode_names_the_file_and_free_space(tiny_tmpfs, make_engine) -> None:
    engine = make_engine(root=tiny_tmpfs, on_io_error="raise")
    kept = engine.store(torch.randn(10))
    written(engine)
    with pytest.raises(RuntimeError, match=r"no room for offloaded tensor .* bytes free in"):
        engine.store(torch.randn(64, 1024))
    assert engine.live_entries() == 1 and engine.inflight_bytes == 0
    del kept


def test_keep_mode_under_warnings_as_errors_leaves_nothing_behind(tiny_tmpfs, make_engine) -> None:
    """``-W error`` turns the "keeping the tensor in memory" warning into the store's error."""
    engine = make_engine(root=tiny_tmpfs)
    kept = engine.store(torch.randn(10))
    written(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="keeping the tensor in memory"):
            engine.store(torch.randn(64, 1024))
    assert engine.live_entries() == 1 and engine.inflight_bytes == 0
    del kept


def test_private_directory_is_owner_only_and_removed_on_close(tmp_path) -> None:
    engine = Engine(str(tmp_path))
    assert os.stat(engine.drives[0].directory).st_mode & 0o777 == 0o700
    assert os.stat(engine.drives[0].file.path).st_mode & 0o777 == 0o600
    handle = engine.store(torch.randn(10))
    written(engine)
    engine.close()
    assert not os.path.exists(engine.drives[0].directory)
    del handle  # a handle outliving its engine is released quietly


GC_WHILE_LOCKED = """
import faulthandler, gc, sys, time, torch
from fxoffload.runtime import Engine, EngineConfig

faulthandler.dump_traceback_later(30, exit=True)  # a deadlock fails the test, with stacks
engine = Engine(sys.argv[1], EngineConfig(io_threads=1))
t = torch.randn(1024)


def cyclic_garbage(tensor):
    cycle = [tensor]
    cycle.append(cycle)


def settle():
    while engine.inflight_bytes:
        time.sleep(0.001)


# A handle that only a reference cycle holds, collected while this thread holds
# the engine's lock: its finalizer releases the entry, which takes that lock.
cyclic_garbage(engine.store(t))
settle()
with engine._lock:
    gc.collect()
print("entries", engine.live_entries())

# A restored tensor (a read buffer from the pool) collected under the pool's lock.
handle = engine.store(t)
settle()
cyclic_garbage(engine.wait(handle))
with engine._staging._lock:
    gc.collect()
print("pooled", engine.staging_bytes_held)
"""


def run_script(script: str, offload_dir) -> list[str]:
    """Run ``script`` in a fresh interpreter (argv[1]: the offload directory); its printed words."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(offload_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_a_collection_while_a_runtime_lock_is_held_defers_the_finalizers(tmp_path) -> None:
    """The collector runs finalizers in whichever thread allocates, locks held or not."""
    # Each finalizer ran once its thread let go of the lock: the entry released, the buffer pooled.
    assert run_script(GC_WHILE_LOCKED, tmp_path) == ["entries", "0", "pooled", "4096"]


STORE_WITHOUT_MEMORY = """
import faulthandler, os, resource, sys, time, torch
from fxoffload.runtime import Engine, EngineConfig

faulthandler.dump_traceback_later(30, exit=True)  # a store that waits forever fails the test
engine = Engine(sys.argv[1], EngineConfig(io_threads=1, staging_pool_bytes=0))
small = torch.randn(1024)
handle = engine.store(small)  # starts the I/O thread while there is room for its stack
while engine.inflight_bytes:
    time.sleep(0.001)
big = torch.empty(256 << 20, dtype=torch.uint8)
with open("/proc/self/statm") as f:
    mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
limits = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (mapped + (64 << 20), limits[1]))
try:
    engine.store(big)  # its staging copy cannot be mapped
except OSError as e:
    print("raised", e.errno)
resource.setrlimit(resource.RLIMIT_AS, limits)
print("inflight", engine.inflight_bytes, "entries", engine.live_entries())
engine.prefetch(handle)
again = engine.store(small)  # would wait forever for the failed store's bytes
print("round trip", bool(torch.equal(engine.wait(again), small)))
"""


def test_a_store_that_cannot_allocate_its_staging_copy_gives_back_its_reservation(
    tmp_path,
) -> None:
    assert run_script(STORE_WITHOUT_MEMORY, tmp_path) == [
        "raised", "12", "inflight", "0", "entries", "1", "round", "trip", "True",
    ]  # fmt: skip


def test_close_lets_a_read_that_a_thread_waits_for_finish(make_engine) -> None:
    engine = make_engine()
    t = torch.randn(1024)
    handle = engine.store(t)
    written(engine)
    gate = block_io_thread(engine)
    engine.prefetch(handle)  # queued behind the gate
    result: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: result.append(engine.wait(handle)), daemon=True)
    waiter.start()
    entry = engine._entry(handle)
    deadline = time.monotonic() + 10
    while entry.read is not None and time.monotonic() < deadline:  # the waiter took the read
        time.sleep(0.001)
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    deadline = time.monotonic() + 10
    while not engine.drives[0].pool._shutdown and time.monotonic() < deadline:  # close is under way
        time.sleep(0.001)
    gate.set()
    closer.join(timeout=10)
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "wait hangs: close dropped the read it waits for"
    assert torch.equal(result[0], t)


def test_an_entry_goes_with_its_handle_not_at_the_next_collection(make_engine) -> None:
    """No reference cycle keeps an entry (and what it holds) until the collector runs."""
    engine = make_engine()
    t = torch.randn(1024)
    gc.disable()
    try:
        handle = engine.store(t)
        entry = weakref.ref(engine._entry(handle))
        written(engine)
        engine.prefetch(handle)
        assert torch.equal(engine.wait(handle), t)
        del handle
        assert entry() is None, "an entry outlived its handle"
    finally:
        gc.enable()


def blocked_in(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is, right now, inside a call of ``function``."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_a_read_takes_its_buffer_without_holding_the_engine_lock(make_engine) -> None:
    """Allocating a read's buffer (page faults, mmap) must not stall store and the I/O threads."""
    engine = make_engine()
    t = torch.randn(1024)
    handle = engine.store(t)
    written(engine)
    with engine._staging._lock:  # the read's buffer allocation waits for it
        prefetcher = threading.Thread(target=engine.prefetch, args=(handle,), daemon=True)
        prefetcher.start()
        deadline = time.monotonic() + 10
        while not blocked_in(prefetcher, "take") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert blocked_in(prefetcher, "take")
        other = threading.Thread(target=engine.live_entries, daemon=True)
        other.start()
        other.join(timeout=5)
        stalled = other.is_alive()
    prefetcher.join(timeout=10)
    assert not stalled, "the engine lock was held while a read took its buffer"
    assert torch.equal(engine.wait(handle), t)


def test_prefetch_and_wait_after_close_say_the_engine_is_closed(make_engine) -> None:
    engine = make_engine()
    handle = engine.store(torch.randn(1024))
    written(engine)
    engine.close()
    for operation in (engine.store, engine.prefetch, engine.wait):
        argument = torch.randn(8) if operation == engine.store else handle
        with pytest.raises(RuntimeError, match=r"fxoffload engine for '.*' is closed"):
            operation(argument)


def test_a_staging_pool_that_raises_leaks_no_reservation(make_engine, monkeypatch) -> None:
    """Whatever giving the buffer back raises, the write's bytes stop counting as in flight.

    The fault is injected at the pool's boundary: no real ``give`` raises on demand.
    """
    engine = make_engine(max_inflight_bytes=4096)

    def give(buffer: torch.Tensor, *, pin_memory: bool) -> None:
        raise MemoryError("injected")

    monkeypatch.setattr(engine._staging, "give", give)
    t = torch.randn(1024)
    handle = engine.store(t)
    engine._wait_writes(engine._entry(handle))
    written(engine)  # a reservation kept would have every later store wait forever
    again = engine.store(t)
    assert torch.equal(engine.wait(again), t)


def test_a_write_leaves_writing_once_it_is_on_disk(make_engine) -> None:
    engine = make_engine()
    gate = block_io_thread(engine)
    t = torch.randn(1024)
    handle = engine.store(t)
    entry = engine._entry(handle)
    assert entry.state is EntryState.WRITING and entry.staging is not None
    gate.set()
    written(engine)
    assert entry.state is EntryState.WRITTEN and entry.staging is None
    assert torch.equal(engine.wait(handle), t)


def test_stats_count_the_io_threads_cpu_time(make_engine) -> None:
    engine = make_engine(chunk_bytes=1 << 16)
    before = fxoffload.stats()
    t = torch.randn(1 << 20)  # 4 MiB: 64 chunks each way, checksummed
    handle = engine.store(t)
    written(engine)
    engine.prefetch(handle)
    assert torch.equal(engine.wait(handle), t)
    assert delta(before, "io_cpu_ns") > 0
    assert fxoffload.stats().as_dict()["io_cpu_ns"] == fxoffload.stats().io_cpu_ns
