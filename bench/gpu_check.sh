#!/usr/bin/env bash
# The CUDA check of issue 14, one command on a GPU machine (under 8 minutes on one H100):
#   1. the tests marked cuda (tests/test_cuda.py): every model trains with the precision plan timed on the
#      GPU, resuming gives the uninterrupted run's numbers, CAMs and the audit on the GPU match the CPU's,
#      and a GPU run's model loads and predicts with CUDA hidden;
#   2. bench/throughput.py on CUDA (engine vs plain PyTorch pipeline, both training on the GPU);
#   3. bench/gradcam.py on CUDA (Grad-CAM latency per model and for the five-model row).
# Exits 1 at once without a CUDA device, and non-zero when a test or a benchmark fails.
#
#     bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi

echo "== device"
if command -v nvidia-smi > /dev/null; then nvidia-smi -L || true; fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to torch ($("$python" -c 'import torch; print(torch.__version__)')): nothing to check" >&2
  exit 1
fi
"$python" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                   f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")'

started=$SECONDS
unset SKIN_TEST_DEVICE  # the tests must run on the GPU, not in their CPU dry-run mode

echo "== tests marked cuda"
# cuBLAS reads its workspace setting once per process: deterministic kernels for the resume test need it at start.
CUBLAS_WORKSPACE_CONFIG=:4096:8 "$python" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --durations=5
echo "(tests: $((SECONDS - started)) s)"

echo "== training throughput on CUDA (bench/throughput.py)"
"$python" bench/throughput.py --device cuda --sizes 128 224 --steps 6 --images 256
echo "(up to here: $((SECONDS - started)) s)"

echo "== Grad-CAM latency on CUDA (bench/gradcam.py)"
"$python" bench/gradcam.py --device cuda --size 224 --repeats 7
echo "== done in $((SECONDS - started)) s"
