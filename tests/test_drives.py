"""Several offload directories, one per drive: tensors split over them, each filling alone.

Real files on this machine's disk and on real tmpfs mounts (skipped where
this process may not mount), real threads and real ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import slots_freed, written
from test_faults import grads

import fxoffload
from fxoffload.options import Options
from fxoffload.runtime import Engine, EngineConfig, close_all, engines, probe
from fxoffload.runtime.drives import Striping
from fxoffload.runtime.engine import EntryState


@pytest.fixture
def mount(tmp_path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs of the given size for the test, when this process may; skip otherwise."""
    mounted: list[Path] = []

    def do_mount(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield do_mount
    close_all()
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def two_dirs(tmp_path) -> list[Path]:
    dirs = [tmp_path / "drive0", tmp_path / "drive1"]
    for d in dirs:
        d.mkdir()
    return dirs


def delta_by_dir(before: fxoffload.OffloadStats, field: str) -> dict[str, int]:
    now, then = getattr(fxoffload.stats(), field), getattr(before, field)
    return {d: n - then.get(d, 0) for d, n in now.items() if n - then.get(d, 0)}


# -- striping ---------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0), (5.0, 1.0, 2.0)])
def test_shares_tile_the_tensor_and_follow_the_weights(weights) -> None:
    chunk = 4096
    striping = Striping(weights, chunk)
    totals = [0] * len(weights)
    for nbytes in [chunk * 7 + 5, 1, chunk, 0, chunk * 13, 3 * chunk - 1] * 20:
        shares = striping.split(nbytes)
        assert shares[0].start == 0 and sum(s.length for s in shares) == nbytes
        for a, b in zip(shares, shares[1:], strict=False):
            assert b.start == a.start + a.length
        assert all(s.start % chunk == 0 for s in shares)  # aligned for direct I/O
        assert len({s.drive for s in shares}) == len(shares)  # one run per drive
        for s in shares:
            totals[s.drive] += s.length
    for drive, weight in enumerate(weights):  # within a chunk of its weighted share
        assert abs(totals[drive] - sum(totals) * weight / sum(weights)) <= chunk


# -- the engine ---------------------------------------------------------------------------


def test_two_directories_on_one_disk_share_each_tensor(two_dirs) -> None:
    engine = Engine([str(d) for d in two_dirs], EngineConfig(io_threads=2, chunk_bytes=4096))
    try:
        assert engine.drive_weights == (1.0, 1.0)  # one file system: equal shares
        before = fxoffload.stats()
        tensors = [torch.randn(n) for n in (5000, 1, 4096 * 3, 0)] + [torch.randn(9, 7).t()]
        handles = [engine.store(t) for t in tensors]
        written(engine)
        for t, h in zip(tensors, handles, strict=True):
            engine.prefetch(h)
            assert torch.equal(engine.wait(h), t)
            assert torch.equal(engine.wait(h), t)  # read again (retain_graph)
        by_dir = delta_by_dir(before, "bytes_written_by_dir")
        assert sorted(by_dir) == sorted(str(d) for d in two_dirs)
        assert sum(by_dir.values()) == fxoffload.stats().bytes_written - before.bytes_written
        assert sorted(delta_by_dir(before, "bytes_read_by_dir")) == sorted(by_dir)
        private = [d.directory for d in engine.drives]
        assert all(os.path.isdir(p) for p in private)
        del handles
        slots_freed(engine)
    finally:
        engine.close()
    assert not any(os.path.exists(p) for p in private)
    assert all(os.listdir(d) == [] for d in two_dirs)


def test_every_directory_is_checked_and_none_is_left_behind(two_dirs, tmp_path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"offload_dir {str(missing)!r} does not exist"):
        Engine([str(two_dirs[0]), str(missing)])
    assert os.listdir(two_dirs[0]) == []
    with pytest.raises(ValueError, match="names .* twice"):
        Options(offload_dir=[str(two_dirs[0]), str(two_dirs[0]) + "/"])


def test_fxoffload_dir_takes_several_directories(two_dirs, monkeypatch) -> None:
    joined = os.pathsep.join(str(d) for d in two_dirs)
    with fxoffload.config.patch(offload_dir=joined):
        assert Options().offload_dirs == tuple(str(d) for d in two_dirs)
    assert Options(offload_dir=[two_dirs[0]]).offload_dir == str(two_dirs[0])


def test_a_full_directory_keeps_only_its_share(mount, tmp_path) -> None:
    disk, small = tmp_path / "disk", mount("2m")
    disk.mkdir()
    engine = Engine([str(disk), str(small)], EngineConfig(io_threads=1, chunk_bytes=64 << 10))
    weights = engine.drive_weights
    assert weights[0] != weights[1]  # two file systems: by their measured write rates
    before = fxoffload.stats()
    tensors = [torch.randn(256 << 10) for _ in range(16)]  # 1 MiB each, 16 MiB in all
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handles = [engine.store(t) for t in tensors]
        written(engine)
    assert any("of the tensor's 1048576 bytes in memory" in str(w.message) for w in caught)
    entries = [engine._entry(h) for h in handles]
    failed = [e for e in entries if e.state is EntryState.FAILED]
    assert failed and len(failed) == fxoffload.stats().io_errors - before.io_errors
    for entry in failed:  # the disk took its share; only the tmpfs share stays in memory
        (on_disk,) = [s for s in entry.shares if s.drive.root == str(disk)]
        (kept,) = [s for s in entry.shares if s.drive.root == str(small)]
        assert on_disk.error is None and on_disk.kept is None
        assert kept.kept is not None and kept.kept.numel() == kept.length
    by_dir = delta_by_dir(before, "bytes_written_by_dir")
    assert by_dir[str(disk)] > 0 and by_dir[str(small)] > 0
    for t, h in zip(tensors, handles, strict=True):
        assert torch.equal(engine.wait(h), t)
        assert torch.equal(engine.wait(h), t)
    del entries, failed, handles
    engine.close()
    assert os.listdir(disk) == [] and os.listdir(small) == []


def test_the_cost_model_counts_each_file_system_once(mount, two_dirs) -> None:
    config = EngineConfig(io_threads=1, chunk_bytes=64 << 10)
    one = Engine([str(two_dirs[0])], config)
    both = Engine([str(d) for d in two_dirs], config)
    mixed = Engine([str(two_dirs[0]), str(mount("4m"))], config)
    try:
        assert probe.disk_rates(both.drives, both.config) == probe.disk_rates(
            one.drives, one.config
        )  # one disk: its bandwidth once
        each = [probe.drive_rates(d, config) for d in mixed.drives]
        write, read, compute = probe.disk_rates(mixed.drives, mixed.config)
        assert write == pytest.approx(each[0][0] + each[1][0])
        assert read == pytest.approx(each[0][1] + each[1][1])
        assert min(e[2] for e in each) <= compute <= max(e[2] for e in each)
        assert mixed.drive_weights == pytest.approx((each[0][0], each[1][0]))
    finally:
        for engine in (one, both, mixed):
            engine.close()


def test_raise_mode_names_the_directory_that_filled(mount, tmp_path) -> None:
    disk, small = tmp_path / "disk", mount("256k")
    disk.mkdir()
    config = EngineConfig(io_threads=1, chunk_bytes=64 << 10, on_io_error="raise")
    engine = Engine([str(disk), str(small)], config)
    try:
        handles = []  # held: their slots stay taken
        with pytest.raises(RuntimeError, match=f"no room for offloaded tensor .* in {small}/"):
            for _ in range(16):
                handles.append(engine.store(torch.randn(256 << 10)))
    finally:
        engine.close()


# -- training -------------------------------------------------------------------------------


class Wide(torch.nn.Module):
    """Four Linear+GELU blocks of width 512: on a batch of 1024, 2 MiB per activation."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(512, 512) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x.square().mean()


def batch(seed: int) -> torch.Tensor:
    return torch.randn(1024, 512, generator=torch.Generator().manual_seed(seed))


def train(offload_dir, policy: str, steps: int = 3, **options) -> list[torch.Tensor]:
    """Gradients of ``steps`` steps of ``Wide`` compiled with ``offload_dir``, after each."""
    torch.manual_seed(0)
    model = Wide()
    compiled = torch.compile(
        copy.deepcopy(model),
        backend="ssdtrain",
        options={
            "compiler": "aot_eager",
            "policy": policy,
            "min_bytes": 0,
            "chunk_bytes": 64 << 10,
            "offload_dir": offload_dir,
            **options,
        },
    )
    out = []
    for step in range(steps):
        compiled(batch(step)).backward()
        out += grads(compiled)
    return out


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_training_on_two_directories_is_bitwise_and_cleans_up(two_dirs, compiler) -> None:
    dirs = [str(d) for d in two_dirs]
    baseline = train(dirs, "none", compiler=compiler)
    torch._dynamo.reset()
    before = fxoffload.stats()
    assert_equal(train(dirs, "all", compiler=compiler), baseline)
    assert sorted(delta_by_dir(before, "bytes_written_by_dir")) == sorted(dirs)
    assert sorted(delta_by_dir(before, "bytes_read_by_dir")) == sorted(dirs)
    (engine,) = [e for e in engines() if e.roots == tuple(dirs)]
    private = [d.directory for d in engine.drives]
    close_all()
    assert not any(os.path.exists(p) for p in private)


def test_training_goes_on_while_one_directory_fills(mount, tmp_path) -> None:
    disk, small = tmp_path / "disk", mount("4m")  # smaller than its share of a step
    disk.mkdir()
    dirs = [str(disk), str(small)]
    baseline = train(dirs, "none", steps=4)
    torch._dynamo.reset()
    before = fxoffload.stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_equal(train(dirs, "all", steps=4), baseline)
    assert fxoffload.stats().io_errors > before.io_errors
    assert any("of the tensor's" in str(w.message) for w in caught)
    by_dir = delta_by_dir(before, "bytes_written_by_dir")
    assert by_dir[str(disk)] > 0 and by_dir[str(small)] > 0
    close_all()
    assert os.listdir(disk) == [] and os.listdir(small) == []


def test_a_changed_file_is_named_by_its_drive(two_dirs) -> None:
    engine = Engine([str(d) for d in two_dirs], EngineConfig(io_threads=1, chunk_bytes=4096))
    try:
        handle = engine.store(torch.randn(3 * 1024))  # 12 KiB: shares on both drives
        written(engine)
        second = engine.drives[1]
        (share,) = [s for s in engine._entry(handle).shares if s.drive is second]
        with open(second.file.path, "r+b") as f:
            f.seek(share.slot.offset)
            f.write(b"\xff" * 16)
        with pytest.raises(RuntimeError, match=f"cannot read back .* in {second.file.path} .*"):
            engine.wait(handle)
    finally:
        engine.close()


def test_bytes_that_could_not_be_kept_are_an_error_not_garbage(mount, monkeypatch) -> None:
    full = mount("64k")
    dirs = [full / "a", full / "b"]  # one file system: equal shares, nothing to measure
    for d in dirs:
        d.mkdir()
    engine = Engine([str(d) for d in dirs], EngineConfig(io_threads=1, chunk_bytes=4096))
    with contextlib.suppress(OSError), open(full / "filler", "wb", buffering=0) as filler:
        while True:  # until the tmpfs is full: no room for any share
            filler.write(b"\0" * 4096)

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    try:
        t = torch.randn(4 * 1024)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monkeypatch.setattr(torch.Tensor, "clone", no_memory)  # keeping the bytes fails
            handle = engine.store(t)
            engine._wait_writes(engine._entry(handle))
            monkeypatch.undo()
        with pytest.raises(RuntimeError, match="could not keep in memory the bytes it failed"):
            engine.wait(handle)
        written(engine)  # the reservation came back: later stores go on
        assert torch.equal(engine.wait(engine.store(t)), t)
    finally:
        engine.close()
