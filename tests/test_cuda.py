"""CUDA paths: pinned staging copied on the caller's stream, event-synchronised writes.

Everything that is not CUDA-specific is covered by the CPU tests; these run
only where a GPU is present (``benchmarks/gpu_check.sh`` runs them).
"""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import block_io_thread, written
from training_runs import losses_and_grads, reproducible

import fxoffload
from fxoffload.runtime import Engine, EngineConfig, probe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def engine(tmp_path):
    engine = Engine(str(tmp_path), EngineConfig(chunk_bytes=1 << 20, io_threads=1))
    yield engine
    engine.close()


@pytest.mark.parametrize("stream", ["default", "side"])
def test_round_trip_on_the_callers_stream_keeps_layout_and_bytes(engine, stream: str) -> None:
    s = torch.cuda.current_stream() if stream == "default" else torch.cuda.Stream()
    with torch.cuda.stream(s):
        t = torch.randn(2048, 1024, device="cuda").t()
        expected = t.clone()
        handle = engine.store(t)
        t.zero_()  # queued right after the copy: the caller may reuse its memory at once
        written(engine)
        before = fxoffload.stats()
        engine.prefetch(handle)
        out = engine.wait(handle)
        assert out.device == expected.device and out.stride() == expected.stride()
        assert torch.equal(out, expected)
    after = fxoffload.stats()
    assert after.bytes_read - before.bytes_read == expected.numel() * 4
    assert after.tensors_forwarded == before.tensors_forwarded


def test_wait_before_the_write_finishes_copies_to_the_device_without_waiting(engine) -> None:
    gate = block_io_thread(engine)  # the write waits
    t = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    expected = t.clone()
    handle = engine.store(t)
    t.zero_()
    before = fxoffload.stats()
    result: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: result.append(engine.wait(handle)))
    waiter.start()
    waiter.join(timeout=10)
    try:
        assert result, "wait blocked on a write it does not need"
        assert engine.inflight_bytes == t.numel() * 2  # the write has not even started
    finally:
        gate.set()
    assert result[0].is_cuda and torch.equal(result[0], expected)
    assert fxoffload.stats().tensors_forwarded - before.tensors_forwarded == 1
    written(engine)
    # The write went on from the same buffer, which a copy used: not pooled.
    assert engine.staging_bytes_held == 0
    engine.prefetch(handle)
    assert torch.equal(engine.wait(handle), expected)  # and the file has the bytes


def test_pinned_staging_buffers_are_reused(engine) -> None:
    tensors = [torch.randn(256, 1024, device="cuda") for _ in range(4)]
    before = fxoffload.stats()
    handles = []
    for t in tensors:
        handles.append(engine.store(t))
        written(engine)
    assert fxoffload.stats().staging_reused - before.staging_reused == len(tensors) - 1
    for h, t in zip(handles, tensors, strict=True):
        engine.prefetch(h)
        assert torch.equal(engine.wait(h), t)


def warm_up(nbytes: int) -> None:
    """First uses that may synchronize the device (a kernel loaded lazily, a pinned
    allocation) happen here, before a test queues work behind a busy stream."""
    torch.randn(nbytes // 4, device="cuda")
    torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # cached by the host allocator
    torch.cuda.synchronize()


def test_a_write_cancelled_before_its_copy_ran_does_not_pool_the_buffer(engine) -> None:
    """Its copy may still be queued: a read given that buffer would be overwritten by it."""
    warm_up(4 << 20)
    gate = block_io_thread(engine)  # no chunk gets to wait for the copy
    torch.cuda._sleep(1_000_000_000)  # the stream is busy for a while: the copy waits too
    t = torch.randn(1024, 1024, device="cuda")
    handle = engine.store(t)
    assert not engine._entry(handle).copied.query()  # else the test would prove nothing
    del handle  # the graph was dropped: the write is cancelled
    try:
        assert engine.inflight_bytes == 0  # settled by the cancel, not by a write
        assert engine.staging_bytes_held == 0
    finally:
        gate.set()
        torch.cuda.synchronize()
    other = torch.randn(1024, 1024, device="cuda")
    h = engine.store(other)
    written(engine)
    engine.prefetch(h)
    assert torch.equal(engine.wait(h), other)


def test_forwarding_onto_another_stream_waits_for_the_store_copy(engine) -> None:
    """Backward may run on another stream than forward: its copy of the staging
    bytes must still come after the store's copy into them."""
    warm_up(4 << 20)
    gate = block_io_thread(engine)  # the write waits, so wait forwards from staging
    torch.cuda._sleep(1_000_000_000)  # the store's stream is busy: its copy stays queued
    t = torch.randn(1024, 1024, device="cuda")
    handle = engine.store(t)
    assert not engine._entry(handle).copied.query()  # else the test would prove nothing
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            restored = engine.wait(handle)
        torch.cuda.synchronize()
        assert torch.equal(restored, t)
    finally:
        gate.set()


def test_a_tensor_kept_for_want_of_a_slot_comes_back_after_its_copy(tiny_tmpfs) -> None:
    """No room for a slot fails the write before any chunk waited for the copy into
    staging; the kept bytes must still be read only after that copy ran."""
    engine = Engine(str(tiny_tmpfs), EngineConfig(io_threads=1))
    warm_up(1 << 20)
    try:
        torch.cuda._sleep(1_000_000_000)  # the stream is busy: the copy stays queued
        t = torch.randn(256, 1024, device="cuda")  # 1 MiB: more than the disk holds
        with pytest.warns(RuntimeWarning, match="keeping the tensor in memory instead"):
            handle = engine.store(t)
        assert not engine._entry(handle).copied.query()  # else the test would prove nothing
        assert torch.equal(engine.wait(handle), t)
    finally:
        torch.cuda.synchronize()
        engine.close()


class Block(torch.nn.Module):
    """Attention written out (not SDPA: flash attention's backward is not bitwise
    reproducible) plus an MLP, so both matmul and softmax outputs are saved."""

    def __init__(self, width: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.fc = torch.nn.Linear(width, 4 * width)
        self.out = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = (q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5).masked_fill(~mask, -1e4)
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return x + self.out(F.gelu(self.fc(x)))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_autocast_training_is_bitwise_equal_to_none(tmp_path, compiler: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).cuda()
    xs = [torch.randn(8, 128, 256, device="cuda") for _ in range(3)]
    runs = {}
    with reproducible(compiler):
        for policy in ("none", "all", "adaptive"):
            torch._dynamo.reset()
            m = copy.deepcopy(model)
            options = {"compiler": compiler, "policy": policy, "offload_dir": str(tmp_path)}
            if policy == "all":
                options["min_bytes"] = 0
            compiled = torch.compile(m, backend="ssdtrain", options=options)

            def loss_of(x: torch.Tensor, compiled=compiled) -> torch.Tensor:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return compiled(x).float().square().mean()

            before = fxoffload.stats()
            run = losses_and_grads(m, loss_of, xs)
            runs[policy] = (run, fxoffload.stats().bytes_written - before.bytes_written)
    reference, _ = runs["none"]
    for policy in ("all", "adaptive"):
        run, _ = runs[policy]
        differ = [
            f"#{i} by {(a.float() - b.float()).abs().max().item():.3g}"
            for i, (a, b) in enumerate(zip(reference, run, strict=True))
            if not torch.equal(a, b)
        ]  # per step: the loss, then each parameter's grad
        assert not differ, f"{policy}: {len(differ)} tensors differ: {', '.join(differ[:8])}"
    assert runs["all"][1] > 0
    # adaptive measured this GPU, in float32 and in bfloat16, and cached the rates
    with open(probe.cache_path()) as f:
        table = json.load(f)
    name = torch.cuda.get_device_name()
    (compute,) = [v for k, v in table.items() if k.startswith(f"compute:{name}:")]
    assert len(compute) == 4 and min(compute) > 0
