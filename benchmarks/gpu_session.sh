#!/usr/bin/env bash
# The GPU checks of one device lease, most valuable first, each under its own time limit
# (STEPS picks them, default "finetune tests"):
#   finetune: the --finetune accuracy table, written to $OUT/accuracy_pacs_mini_finetune.* after every run, going on
#      from benchmarks/results/accuracy_pacs_mini_finetune.json once one is committed (--resume: only the runs it lacks; cut by
#      FINETUNE_SECONDS; accuracy.py writes after every run, and runs go seed by seed, then method by
#      method; FINETUNE_METHODS picks the rows, FINETUNE_ARGS adds options, e.g. "--pairs art_painting+sketch"),
#   tests: the test suite on CUDA (TEST_DEVICE=cuda; pytest-xdist when installed),
#   bench: bench_augment.py on CUDA,
#   step: bench_step.py on CUDA (resnet50 at 224 px; never measured yet), cut by STEP_SECONDS; its table
#      ends with where a step's GPU time goes (kernel time, kernels a step, top operators).
# Run from the repository root on the device machine, with .devpack/ carried: benchmarks/pack_device.sh
# writes it (the wheels the image lacks and pacs-mini, xz-compressed to fit one call's 64 MiB).
# Without .devpack it falls back to wheels in .whl/ and pacs-mini at $PACS.
# Results and logs go to $OUT (default /tmp/out).
set -u -o pipefail
OUT=${OUT:-/tmp/out}
PACS=${PACS:-/tmp/pacs-mini}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-30}
FINETUNE_SECONDS=${FINETUNE_SECONDS:-450}  # with the tests and unpacking, under a call's 600 s
FINETUNE_JOBS=${FINETUNE_JOBS:-4}  # runs sharing the GPU: one per pair, so a seed's 4 pairs run together
# '|'-separated, in the order they run; later seeds need no "raw features" (it does not depend on the seed)
FINETUNE_METHODS=${FINETUNE_METHODS:-raw features|ProtoOT official|ProtoOT default}
IFS='|' read -r -a finetune_methods <<<"$FINETUNE_METHODS"
TEST_SECONDS=${TEST_SECONDS:-150}  # 8 workers on an H200: 98 % of the suite in 90 s
BENCH_SECONDS=${BENCH_SECONDS:-45}  # 45 s cut bench_augment short on an H200: give it more when the finetune leaves time
STEP_SECONDS=${STEP_SECONDS:-150}
STEPS=${STEPS:-finetune tests}
mkdir -p "$OUT"
# The committed results would be copied to $OUT in place of a step that wrote nothing.
rm -f benchmarks/results/bench_augment_cuda.* benchmarks/results/bench_step_cuda.*
export PYTHONUNBUFFERED=1
if [ -f .devpack/site.tar.xz ]; then
    tar xJf .devpack/site.tar.xz -C /tmp || exit 1
    mkdir -p "$PACS" && tar xJf .devpack/pacs-mini.tar.xz -C "$PACS" --strip-components=1 || exit 1
elif ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# where the tests and benchmarks look for it: ../shared/data/pacs-mini (a real folder there is kept)
if [ -d "$PACS" ] && { [ -L ../shared/data/pacs-mini ] || [ ! -e ../shared/data/pacs-mini ]; }; then
    mkdir -p ../shared/data && ln -sfn "$PACS" ../shared/data/pacs-mini
fi
[ -d "$PACS/photo" ] || { echo "no pacs-mini at $PACS: carry .devpack (benchmarks/pack_device.sh)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# Fail here, in seconds, rather than in every step: the packages, the package itself, and CUDA.
python3 -c "import torch, torchvision, timm, pytorch_metric_learning as p, faiss, ot, pml_protoot
assert torch.cuda.is_available(), 'CUDA is not available'
print(torch.__version__, torchvision.__version__, timm.__version__, p.__version__, faiss.__version__, ot.__version__)" \
    | tee -a "$OUT/gpu.txt" || exit 1

if [[ " $STEPS " == *" finetune "* ]]; then
    # The table is written straight into $OUT after every run (atomically): if the call is cut
    # short, the finished runs still come back. It goes on from the committed table, if any.
    cp benchmarks/results/accuracy_pacs_mini_finetune.json "$OUT/" 2>/dev/null || true
    # timeout signals the whole process group: the --jobs worker processes end with the script.
    timeout "$FINETUNE_SECONDS" python3 benchmarks/accuracy.py --finetune --device cuda --no-joint --resume \
        --jobs "$FINETUNE_JOBS" --workers 2 \
        --epochs "$FINETUNE_EPOCHS" --methods "${finetune_methods[@]}" \
        --data "$PACS" --out "$OUT/accuracy_pacs_mini_finetune" ${FINETUNE_ARGS:-} >"$OUT/finetune.log" 2>&1
    rc=$?
    tr '\r' '\n' <"$OUT/finetune.log" | grep -v "it/s\|s/it\|^ *$" | tail -20  # without progress bars
    # 124: cut at FINETUNE_SECONDS, as planned (the next call goes on with --resume); anything else: read the log
    echo "finetune exit code $rc$([ "$rc" = 124 ] && echo ' (cut at FINETUNE_SECONDS: resume next call)')"
    # a write cut by the signal leaves its hidden temporary file; the finished table is intact beside it
    find "$OUT" -maxdepth 1 -name '.*.tmp' -delete
fi
if [[ " $STEPS " == *" tests "* ]]; then
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    # The whole log comes back in $OUT (a failure's traceback too). -v writes each test's outcome as it
    # ends: a run cut at TEST_SECONDS (before pytest's summary) still names its failures, printed here.
    TEST_DEVICE=cuda timeout "$TEST_SECONDS" python3 -m pytest -v -p no:cacheprovider --tb=short -rfE $parallel \
        tests >"$OUT/tests_cuda.log" 2>&1
    echo "tests exit code $?"
    grep -E "(FAILED|ERROR) " "$OUT/tests_cuda.log" | sort -u | head -20
    grep -cE " PASSED " "$OUT/tests_cuda.log" | sed 's/$/ passed/'
    tail -3 "$OUT/tests_cuda.log"
fi
if [[ " $STEPS " == *" bench "* ]]; then
    # 128 images: the PIL side's four passes over 256 (calibration + 3 rounds, about 16 s on one core)
    # and CUDA's start left 256 unfinished at 45 s on the H200
    timeout "$BENCH_SECONDS" python3 benchmarks/bench_augment.py --device cuda --images 128 2>&1 | tail -8
    cp benchmarks/results/bench_augment_cuda.* "$OUT/"
fi
if [[ " $STEPS " == *" step "* ]]; then
    timeout "$STEP_SECONDS" python3 benchmarks/bench_step.py --device cuda --trunk resnet50 --image-size 224 \
        --name bench_step_cuda 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -30
    cp benchmarks/results/bench_step_cuda.* "$OUT/"
fi
