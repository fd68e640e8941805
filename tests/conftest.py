"""Shared fixtures: the device under test (``TEST_DEVICE``) and the shared data folder."""
import os
from pathlib import Path

import pytest
import torch

TEST_DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PACS_MINI = SHARED / "data" / "pacs-mini"

# One thread keeps the 2-core CI machine responsive and faiss deterministic.
torch.set_num_threads(1)


@pytest.fixture
def device():
    return TEST_DEVICE


@pytest.fixture
def pacs_mini():
    """Path to ../shared/data/pacs-mini, skipping where it is absent (users' machines)."""
    if not PACS_MINI.is_dir():
        pytest.skip(f"shared data not found at {PACS_MINI} (it exists only on the project's machines)")
    return PACS_MINI


@pytest.fixture
def exact_float32():
    """Full float32 convolutions and matmuls on CUDA (no TF32) for the duration of a test.

    Tests that compare a pipeline's scores with a reference computed separately need it:
    cuDNN's default TF32 convolutions perturb embeddings by ~1e-3, enough to swap near-tied
    neighbours of an untrained model (seen on an H200: P@1 0.260 vs 0.267).
    """
    matmul = torch.backends.cuda.matmul.allow_tf32  # a property of cuBLAS's module: monkeypatch cannot restore it
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
