"""CUDA paths: pinned staging on the caller's stream, event-synchronised writes.

Everything that is not CUDA-specific is covered by the CPU tests; these run
only where a GPU is present (``benchmarks/gpu_check.sh`` runs them).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxoffload
from fxoffload.runtime import Engine, EngineConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_round_trip_keeps_device_layout_and_bytes(tmp_path) -> None:
    engine = Engine(str(tmp_path), EngineConfig(chunk_bytes=1 << 20))
    try:
        t = torch.randn(512, 1024, device="cuda").t()
        handle = engine.store(t)
        t_copy = t.clone()
        t.zero_()  # the caller's memory is free to reuse once store returns
        out = engine.wait(handle)
        assert out.device == t_copy.device and out.stride() == t_copy.stride()
        assert torch.equal(out, t_copy)
    finally:
        engine.close()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_training_step_is_bitwise_equal(tmp_path, compiler: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)
    ).cuda()
    x = torch.randn(2048, 1024, device="cuda")
    grads = {}
    for policy in ("none", "all"):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        options = {"compiler": compiler, "policy": policy, "offload_dir": str(tmp_path)}
        torch.compile(m, backend="ssdtrain", options=options)(x).square().mean().backward()
        grads[policy] = [p.grad for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads["all"], strict=True))
    assert fxoffload.stats().bytes_written > 0
