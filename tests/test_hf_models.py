"""End to end on Hugging Face models: GPT-2, BERT and T5, trained with offloading.

The toy models of ``test_training.py`` are written for the test; these are
the models people actually compile, with what that brings: tied embeddings,
attention masks turned into additive biases, relative position buckets (T5),
an encoder-decoder with cross-attention, the loss computed inside the model,
dropout everywhere, eager attention and ``F.scaled_dot_product_attention``.

Each model is built from a tiny config (no download, no hub access) and
trains a couple of SGD steps twice from the same weights and seed: compiled
with ``policy="none"`` and with ``policy="all"`` and a small ``min_bytes``, so
nearly every saved activation goes to a file. Offloading moves bytes and must
not change math, so losses, gradients and final weights are bitwise equal;
the offloaded run really wrote bytes and holds no handle once a step's graph
is gone. Under aot_eager, which runs eager's kernels and dropout, the
baseline is also checked against eager, which catches a baseline that is
itself wrong.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from training_runs import assert_runs_close, assert_runs_equal, reproducible
from zoo_models import (
    Case,
    assert_dropout_is_active,
    assert_gradients_where_expected,
    bert,
    bert_batch,
    gpt2,
    gpt2_batch,
    make,
    t5,
    t5_batch,
    train,
)

STEPS = 2

# Disabling inductor's caches (see ``reproducible``) also disables dynamo's
# profile-guided shapes, which torch announces on every compile.
pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")


CASES = {
    "gpt2": Case(gpt2, gpt2_batch),
    "gpt2-sdpa": Case(functools.partial(gpt2, "sdpa"), gpt2_batch),
    "bert": Case(bert, bert_batch),
    "t5": Case(t5, t5_batch),
}

PARAMS = [
    pytest.param("gpt2", "aot_eager"),
    pytest.param("bert", "aot_eager"),
    pytest.param("t5", "aot_eager"),
    # Inductor only for GPT-2, with SDPA, the cheapest to compile: its two
    # compiles still take about 60 s of this file's two minutes on two CPU cores.
    pytest.param("gpt2-sdpa", "inductor"),
]


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_dropout_is_active(name: str) -> None:
    """The bitwise comparison below covers dropout replay only if dropout is on."""
    model, (batch, *_) = make(CASES[name], STEPS)
    assert_dropout_is_active(CASES[name], model, batch)


@pytest.mark.parametrize(("name", "compiler"), PARAMS)
def test_offloaded_training_matches_baseline_bitwise(
    name: str, compiler: str, tmp_path: Path
) -> None:
    case = CASES[name]
    model, batches = make(case, STEPS)
    options = {"compiler": compiler, "min_bytes": 4096, "offload_dir": str(tmp_path)}
    with reproducible(compiler):
        baseline = train(case, model, batches, {**options, "policy": "none"})
        offloaded = train(case, model, batches, {**options, "policy": "all"})
    if compiler == "aot_eager":
        # Inductor draws dropout masks with its own RNG, so only aot_eager can match eager.
        assert_runs_close(train(case, model, batches, None), baseline)

    # The baseline wrote nothing; the offloaded run wrote a lot and got it all back.
    assert baseline.stats.tensors_stored == 0 and baseline.stats.bytes_written == 0
    assert offloaded.stats.tensors_stored > 10 * STEPS, offloaded.stats
    assert offloaded.stats.bytes_written > 0
    assert offloaded.stats.bytes_read > 0 or offloaded.stats.tensors_forwarded > 0
    assert offloaded.stats.io_errors == 0
    # Every parameter trains (BertForMaskedLM builds no pooler), so every
    # gradient is compared.
    assert_gradients_where_expected(case, model, baseline)
    assert_runs_equal(baseline, offloaded)
