#!/usr/bin/env bash
# One prepared run on a lent GPU machine: CUDA tests, then the I/O benchmark.
# Usage (from the repository root): bash benchmarks/gpu_check.sh
# The GPU machines have torch with CUDA but no network: install the project without deps.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation -q . 2>/dev/null || python -m pip install --no-deps -q .
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q tests/test_cuda.py tests/test_engine.py
python benchmarks/io_bandwidth.py --dir "${FXOFFLOAD_DIR:-/tmp}"
