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
