"""The engine on its own: real files, real worker threads, no compiler."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch

import fxoffload
from fxoffload.runtime import Engine
from fxoffload.runtime.handles import handle_id


@pytest.fixture
def engine(tmp_path):
    engine = Engine(str(tmp_path), io_threads=1)
    yield engine
    engine.close()


def files_in(engine: Engine) -> list[str]:
    return sorted(os.listdir(engine.directory))


def wait_for_write(engine: Engine) -> None:
    """Let queued writes finish (the single I/O thread runs jobs in order)."""
    engine._pool.submit(lambda: None).result()


def block_io_thread(engine: Engine) -> threading.Event:
    """Occupy the engine's only I/O thread until the returned event is set."""
    gate = threading.Event()
    engine._pool.submit(gate.wait)
    return gate


@pytest.mark.parametrize(
    "t",
    [
        torch.rand(7, 13) > 0.5,
        torch.randint(-128, 127, (1001,), dtype=torch.int8),
        torch.randn(3, 5, 17, dtype=torch.bfloat16),
        torch.randn(33, 9, dtype=torch.float64).t(),
        torch.randn(4, 6, dtype=torch.complex64).permute(1, 0),
        torch.randn(2, 1, 5)[:, :, 1:4].contiguous(),
    ],
    ids=["bool", "int8-odd", "bf16", "fp64-transposed", "complex-permuted", "size1-dim"],
)
def test_round_trip_is_exact(engine: Engine, t: torch.Tensor) -> None:
    handle = engine.store(t)
    wait_for_write(engine)
    assert files_in(engine) == [f"{handle_id(handle)}.bin"]
    out = engine.wait(handle)
    assert out.dtype == t.dtype and out.shape == t.shape and out.stride() == t.stride()
    assert torch.equal(out, t)
    del handle
    gc.collect()
    assert files_in(engine) == [] and engine.live_entries() == 0


def test_wait_twice_reads_the_file_twice(engine: Engine) -> None:
    t = torch.randn(256, 256)
    handle = engine.store(t)
    wait_for_write(engine)
    before = fxoffload.stats()
    engine.prefetch(handle)
    first = engine.wait(handle)
    first.zero_()  # backward may reuse what wait returned; the file must not care
    second = engine.wait(handle)
    assert torch.equal(second, t)
    assert fxoffload.stats().bytes_read - before.bytes_read == 2 * t.numel() * 4


def test_wait_before_the_write_finishes_forwards_from_memory(engine: Engine) -> None:
    t = torch.randn(64, 64)
    gate = block_io_thread(engine)
    handle = engine.store(t)
    before = fxoffload.stats()
    result: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: result.append(engine.wait(handle)))
    waiter.start()
    time.sleep(0.05)
    assert not result  # wait holds the bytes back until the write is done
    gate.set()
    waiter.join(timeout=10)
    assert torch.equal(result[0], t)
    after = fxoffload.stats()
    assert after.tensors_forwarded - before.tensors_forwarded == 1
    assert after.bytes_read == before.bytes_read
    # The file is complete, so a second wait (retain_graph) reads it.
    assert torch.equal(engine.wait(handle), t)


def test_handle_freed_before_its_write_cancels_it(engine: Engine) -> None:
    gate = block_io_thread(engine)
    handle = engine.store(torch.randn(1000))
    del handle
    gc.collect()
    gate.set()
    wait_for_write(engine)
    assert files_in(engine) == [] and engine.live_entries() == 0


def test_failed_write_keeps_the_tensor_in_memory(engine: Engine) -> None:
    t = torch.randn(128, 3)
    os.rmdir(engine.directory)  # every write now fails with FileNotFoundError
    before = fxoffload.stats()
    with pytest.warns(RuntimeWarning, match="keeping the tensor in memory instead"):
        handle = engine.store(t)
        wait_for_write(engine)
    assert fxoffload.stats().io_errors - before.io_errors == 1
    first = engine.wait(handle)
    first.zero_()
    assert torch.equal(engine.wait(handle), t)


def test_truncated_file_is_an_error_not_wrong_data(engine: Engine) -> None:
    handle = engine.store(torch.randn(100))
    wait_for_write(engine)
    (name,) = files_in(engine)
    path = os.path.join(engine.directory, name)
    os.truncate(path, 10)
    with pytest.raises(RuntimeError, match=f"cannot read back offloaded tensor .* from {path}"):
        engine.wait(handle)


def test_private_directory_is_owner_only_and_removed_on_close(tmp_path) -> None:
    engine = Engine(str(tmp_path))
    assert os.stat(engine.directory).st_mode & 0o777 == 0o700
    handle = engine.store(torch.randn(10))
    wait_for_write(engine)
    (name,) = files_in(engine)
    assert os.stat(os.path.join(engine.directory, name)).st_mode & 0o777 == 0o600
    engine.close()
    assert not os.path.exists(engine.directory)
    del handle  # a handle outliving its engine is released quietly
