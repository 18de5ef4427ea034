"""Faults, odd autograd use and long runs: nothing lost, nothing leaked, never wrong bits.

Every fault here is real: a full tmpfs, a read-only mount, bytes overwritten
in the offload file, another process. Compiles use ``aot_eager`` (fast);
the rewritten graphs are the same ones inductor gets.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import slots_freed
from subprocess_scripts import TINY_TRAINING_STEP, run_python
from test_training import SDPATransformerBlock

import fxoffload
from fxoffload.runtime import Engine, close_all, engines, probe
from fxoffload.runtime.private_dir import make_private_dir


class Blocks(torch.nn.Module):
    """Four Linear+GELU blocks: each saves a 256 KiB activation (batch 256)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x.square().mean()


class PrintInTheMiddle(Blocks):
    """A graph break: two compiled regions, each offloading its own activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = torch.nn.functional.gelu
        x = gelu(self.layers[1](gelu(self.layers[0](x))))
        print("halfway")  # not inside a loop: dynamo would skip the whole frame
        x = gelu(self.layers[3](gelu(self.layers[2](x))))
        return x.square().mean()


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(256, 256, generator=torch.Generator().manual_seed(seed))


def compiled(model: torch.nn.Module, offload_dir: Path, **options) -> torch.nn.Module:
    options = {
        "compiler": "aot_eager",
        "policy": "all",
        "min_bytes": 0,
        "offload_dir": str(offload_dir),
        **options,
    }
    return torch.compile(model, backend="ssdtrain", options=options)


def both_policies(
    offload_dir: Path, step: Callable[[torch.nn.Module], list[torch.Tensor]], model=Blocks
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``step`` on a compiled copy of one model under "none" and "all"."""
    torch.manual_seed(0)
    base = model()
    results = []
    for policy in ("none", "all"):
        torch._dynamo.reset()
        m = copy.deepcopy(base)
        results.append(step(compiled(m, offload_dir, policy=policy)) + grads(m))
    return results[0], results[1]


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_nothing_held(offload_dir: Path) -> None:
    gc.collect()
    for engine in engines():
        if Path(engine.roots[0]) == offload_dir:
            assert engine.live_entries() == 0
            slots_freed(engine)


def stored_since(before: fxoffload.OffloadStats) -> int:
    return fxoffload.stats().tensors_stored - before.tensors_stored


# -- autograd use -----------------------------------------------------------------


def test_retain_graph_with_two_backwards(tmp_path) -> None:
    def step(m):
        loss = m(batch())
        loss.backward(retain_graph=True)
        first = grads(m)
        loss.backward()
        return [loss.detach(), *first]

    assert_equal(*both_policies(tmp_path, step))
    assert_nothing_held(tmp_path)


def test_gradient_accumulation_then_one_backward(tmp_path) -> None:
    def step(m):
        loss = sum(m(batch(i)) for i in range(3))
        loss.backward()
        return [loss.detach()]

    before = fxoffload.stats()
    assert_equal(*both_policies(tmp_path, step))
    assert stored_since(before) >= 3 * 4
    assert_nothing_held(tmp_path)


def test_autograd_grad_instead_of_backward(tmp_path) -> None:
    def step(m):
        x = batch().requires_grad_()
        (gx,) = torch.autograd.grad(m(x), [x])
        return [gx]

    assert_equal(*both_policies(tmp_path, step))
    assert_nothing_held(tmp_path)


def test_two_forwards_with_interleaved_backwards(tmp_path) -> None:
    def step(m):
        first, second = m(batch(1)), m(batch(2))
        second.backward()
        after_second = grads(m)
        first.backward()
        return [first.detach(), second.detach(), *after_second]

    assert_equal(*both_policies(tmp_path, step))
    assert_nothing_held(tmp_path)


def test_forward_without_backward_releases_everything(tmp_path) -> None:
    m = compiled(Blocks(), tmp_path)
    before = fxoffload.stats()
    loss = m(batch())
    assert torch.isfinite(loss)
    assert stored_since(before) > 0
    del loss  # e.g. skipped because it was NaN
    assert_nothing_held(tmp_path)


def test_exception_between_forward_and_backward(tmp_path) -> None:
    m = compiled(Blocks(), tmp_path)

    def failing_step() -> None:
        loss = m(batch())
        raise ValueError(f"user code failed after forward ({loss.item():.3f})")

    with pytest.raises(ValueError, match="user code failed"):
        failing_step()
    assert_nothing_held(tmp_path)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inference_touches_no_file(tmp_path, mode) -> None:
    m = compiled(Blocks(), tmp_path)
    before = fxoffload.stats()
    with mode():
        m(batch())
    now = fxoffload.stats()
    assert now.tensors_stored == before.tensors_stored
    assert now.bytes_written == before.bytes_written and now.bytes_read == before.bytes_read


# -- models and dtypes ----------------------------------------------------------------


def test_graph_break_offloads_in_each_region(tmp_path, capsys) -> None:
    def step(m):
        loss = m(batch())
        loss.backward()
        return [loss.detach()]

    before = fxoffload.stats()
    assert_equal(*both_policies(tmp_path, step, model=PrintInTheMiddle))
    assert "halfway" in capsys.readouterr().out
    assert stored_since(before) > 0
    torch._dynamo.reset()
    report = fxoffload.explain(
        PrintInTheMiddle(),
        batch(),
        options={"compiler": "aot_eager", "policy": "all", "min_bytes": 0},
    )
    assert len(report.graphs) == 2
    assert all(any(d.offload for d in g.decisions) for g in report.graphs)
    assert_nothing_held(tmp_path)


def test_two_models_share_one_engine(tmp_path) -> None:
    a, b = compiled(Blocks(), tmp_path), compiled(Blocks(), tmp_path)
    before = fxoffload.stats()
    a(batch()).backward()
    one_model = stored_since(before)
    (a(batch()) + b(batch())).backward()
    assert stored_since(before) == 3 * one_model > 0
    assert len(engines_in(tmp_path)) == 1
    assert_nothing_held(tmp_path)


def engines_in(offload_dir: Path) -> list[Engine]:
    return [e for e in engines() if Path(e.roots[0]) == offload_dir]


def test_a_compiled_graph_finds_its_engine_after_close_all(tmp_path) -> None:
    """The graph names its engine's settings: the one made after ``close_all`` has them."""
    model = compiled(Blocks(), tmp_path, io_threads=1, verify=False, on_io_error="raise")
    model(batch()).backward()
    close_all()
    model(batch()).backward()
    (engine,) = engines_in(tmp_path)
    assert (engine.config.io_threads, engine.config.verify, engine.config.on_io_error) == (
        1,
        False,
        "raise",
    )


def test_other_io_settings_on_one_directory_get_an_engine_of_their_own(tmp_path) -> None:
    a = compiled(Blocks(), tmp_path, io_threads=1)
    b = compiled(Blocks(), tmp_path, io_threads=2, chunk_bytes=64 << 10)
    before = fxoffload.stats()
    (a(batch()) + b(batch())).backward()
    found = sorted(engines_in(tmp_path), key=lambda e: e.config.io_threads)
    assert [(e.config.io_threads, e.config.chunk_bytes) for e in found] == [
        (1, 8 << 20),
        (2, 64 << 10),
    ]
    assert all(e.drives[0].file.size > 0 for e in found) and stored_since(before) > 0
    assert_nothing_held(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(tmp_path, dtype) -> None:
    def step(m):
        with torch.autocast("cpu", dtype=dtype):
            loss = m(batch())
        loss.backward()
        return [loss.detach()]

    before = fxoffload.stats()
    assert_equal(*both_policies(tmp_path, step))
    assert stored_since(before) > 0
    assert_nothing_held(tmp_path)


class DropoutBlocks(Blocks):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.dropout(x, 0.3, training=True))


def test_dropout_rng_replays(tmp_path) -> None:
    def step(m):
        torch.manual_seed(7)
        loss = m(batch())
        loss.backward()
        return [loss.detach()]

    assert_equal(*both_policies(tmp_path, step, model=DropoutBlocks))


# -- the disk -------------------------------------------------------------------------


@pytest.fixture
def mount(tmp_path) -> Iterator[Callable[..., Path]]:
    """Mount a small tmpfs for the test, when this process may; skip otherwise."""
    mounted = []

    def do_mount(options: str) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield do_mount
    for engine in list(engines()):
        if any(Path(engine.roots[0]) == p for p in mounted):
            engine.close()
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_keeps_tensors_in_memory(mount) -> None:
    small = mount("size=512k")  # room for two of the four activations

    def step(m):
        loss = m(batch())
        loss.backward()
        return [loss.detach()]

    before = fxoffload.stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        none, offloaded = both_policies(small, step)
    assert_equal(none, offloaded)
    assert fxoffload.stats().io_errors - before.io_errors >= 1
    assert fxoffload.stats().bytes_written - before.bytes_written > 0  # it wrote what fit
    full = [w for w in caught if "keeping the tensor in memory" in str(w.message)]
    assert len(full) == 1 and "262144 bytes" in str(full[0].message)
    assert_nothing_held(small)


def test_disk_full_raises_when_asked(mount) -> None:
    small = mount("size=512k")
    m = compiled(Blocks(), small, on_io_error="raise")
    with pytest.raises(RuntimeError, match=r"no room for offloaded tensor .* bytes free in"):
        m(batch())
    assert_nothing_held(small)


def test_unmeasurable_disk_makes_adaptive_offload_nothing(mount) -> None:
    # 512 KiB leaves no room for the 64 MiB bandwidth probe.
    small = mount("size=512k")
    before = fxoffload.stats()
    with pytest.warns(RuntimeWarning, match="could not measure the disk of .*too slow"):
        m = compiled(Blocks(), small, policy="adaptive")
        m(batch()).backward()
    assert fxoffload.stats().tensors_stored == before.tensors_stored
    # Not cached: the disk is measured again next time (compute rates are cached).
    with open(probe.cache_path()) as f:
        keys = json.load(f)
    assert not [k for k in keys if k.startswith(f"disk:{probe.file_system(str(small))}:")]
    assert_nothing_held(small)


def test_read_only_offload_dir_fails_at_compile_time(mount) -> None:
    read_only = mount("ro,size=1m")
    with pytest.raises(Exception, match=f"offload_dir '{read_only}'"):
        compiled(Blocks(), read_only)(batch())


def test_file_changed_between_forward_and_backward_is_an_error(tmp_path) -> None:
    m = compiled(Blocks(), tmp_path)
    loss = m(batch())
    (engine,) = [e for e in engines() if Path(e.roots[0]) == tmp_path]
    while engine.inflight_bytes:
        time.sleep(0.001)
    with open(engine.drives[0].file.path, "r+b") as f:
        f.write(b"\xff" * 64)  # overwrite the first slot's first bytes
    with pytest.raises(RuntimeError, match=r"cannot read back offloaded .*checksum mismatch"):
        loss.backward()


def test_file_deleted_between_forward_and_backward_is_harmless(tmp_path) -> None:
    """The engine reads through its open descriptor: an unlinked file keeps its bytes."""

    def step(m):
        loss = m(batch())
        for engine in [e for e in engines() if Path(e.roots[0]) == tmp_path]:  # none for "none"
            while engine.inflight_bytes:
                time.sleep(0.001)
            os.unlink(engine.drives[0].file.path)
        loss.backward()
        return [loss.detach()]

    before = fxoffload.stats()
    assert_equal(*both_policies(tmp_path, step))
    assert fxoffload.stats().bytes_read > before.bytes_read


def test_symlink_in_place_of_the_file_is_refused(tmp_path) -> None:
    from fxoffload.runtime.offload_file import OffloadFile

    (tmp_path / "target").write_bytes(b"")
    os.symlink(tmp_path / "target", tmp_path / "offload.bin")
    with pytest.raises(FileExistsError):
        OffloadFile(str(tmp_path))


# -- processes ------------------------------------------------------------------------

_TRAIN_SCRIPT = """
import os, sys, torch
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
options = {"compiler": "aot_eager", "policy": "all", "min_bytes": 0, "offload_dir": sys.argv[1]}
m = torch.compile(model, backend="ssdtrain", options=options)
for _ in range(20):
    m(torch.randn(512, 256)).sum().backward()
import fxoffload
(engine,) = fxoffload.runtime.engines()
print(os.path.basename(engine.drives[0].directory), fxoffload.stats().bytes_written)
"""


def test_two_processes_share_an_offload_dir(tmp_path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRAIN_SCRIPT, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    dirs = [out.split()[0] for out, _ in outputs]
    assert dirs[0] != dirs[1] and all(int(out.split()[1]) > 0 for out, _ in outputs)
    # Each removed its own directory at exit.
    assert list(tmp_path.iterdir()) == []


KILLED_AFTER_A_STEP = (
    TINY_TRAINING_STEP
    + """
import os, signal
from fxoffload.runtime import engines
print(engines()[0].drives[0].directory, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
)


def test_stale_directories_of_dead_processes_are_removed(tmp_path) -> None:
    live = make_private_dir(str(tmp_path))
    killed = run_python(KILLED_AFTER_A_STEP, str(tmp_path))
    stale = Path(killed.stdout.strip())
    try:
        assert stale.exists()
        compiled(Blocks(), tmp_path)(batch()).backward()
        assert not stale.exists()
        assert Path(live.path).exists()
    finally:
        live.remove()


# -- a long run -----------------------------------------------------------------------


def test_soak_resources_stay_flat(tmp_path) -> None:
    """``FXOFFLOAD_SOAK_STEPS=1000 pytest -k soak -s`` for the full run (CI runs 100)."""
    steps = int(os.environ.get("FXOFFLOAD_SOAK_STEPS", "100"))
    m = compiled(Blocks(), tmp_path)
    optimizer = torch.optim.SGD(m.parameters(), lr=1e-3)

    def resources() -> tuple[int, int, int, int]:
        (engine,) = [e for e in engines() if Path(e.roots[0]) == tmp_path]
        fds = len(os.listdir("/proc/self/fd"))
        files = len(os.listdir(engine.drives[0].directory))
        return fds, files, engine.drives[0].file.bytes_in_use, engine.drives[0].file.size

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    samples = []
    for i in range(steps):
        m(batch(i % 7)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 10:
            samples.append(resources())
        if i in (10, steps - 1):
            print(
                f"step {i}: RSS {rss_mib():.1f} MiB, resources (fds, files, slot bytes, "
                f"file bytes) {resources()}"
            )
    assert len(set(samples)) == 1, set(samples)
    fds, files, in_use, _ = samples[-1]
    assert files == 2 and in_use == 0  # the offload file and the lock file


class Attention(torch.nn.Module):
    """A transformer block: its query, key and value are views with gaps of one projection."""

    def __init__(self) -> None:
        super().__init__()
        self.block = SDPATransformerBlock(p=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x).square().mean()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize(
    ("model", "size"),
    [(Blocks, lambda length: (length, 5, 256)), (Attention, lambda length: (4, length, 64))],
    ids=["blocks", "attention"],
)
def test_dynamic_shapes_two_lengths_one_compile(tmp_path, compiler, model, size) -> None:
    """Symbolic sizes reach backward through the handles' shapes (and a base's, for views)."""

    def step(m):
        results = []
        for length in (17, 33):
            x = torch.randn(size(length), generator=torch.Generator().manual_seed(length))
            loss = m(x)
            loss.backward()
            results.append(loss.detach())
        return results

    def compile_dynamic(model, offload_dir, **options):
        options = {
            "compiler": compiler,
            "policy": "all",
            "min_bytes": 0,
            "offload_dir": str(offload_dir),
            **options,
        }
        return torch.compile(model, backend="ssdtrain", options=options, dynamic=True)

    torch.manual_seed(0)
    base = model()
    results = []
    with torch._inductor.config.patch(force_disable_caches=True):
        for policy in ("none", "all"):
            torch._dynamo.reset()
            m = copy.deepcopy(base)
            before = fxoffload.stats()
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            results.append(step(compile_dynamic(m, tmp_path, policy=policy)) + grads(m))
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    assert stored_since(before) > 0
    assert_equal(*results)
    assert_nothing_held(tmp_path)


def test_backward_after_its_engine_closed_says_so(tmp_path) -> None:
    """The compiled backward's prefetch gives the error a store would."""
    model = compiled(Blocks(), tmp_path)
    loss = model(batch())
    for engine in engines_in(tmp_path):
        engine.close()
    with pytest.raises(RuntimeError, match=r"fxoffload engine for '.*' is closed"):
        loss.backward()
