"""Shared test configuration: seeding, data locations, device parametrisation."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("EFFNLP_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    """The benchmark-data folder (../shared/data); tests that need it skip when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR} (set EFFNLP_DATA_DIR)")
    return DATA_DIR


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def tiny_bert(cls_name: str = "BertModel", *, hidden: int = 16, layers: int = 2,
              intermediate: int = 24):
    """A seeded tiny random HF BERT (vocabulary 50, 2 heads, 32 positions, 2 labels), eval mode."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=intermediate,
                                  max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg).eval()


def tiny_batch(n: int = 3, L: int = 7) -> dict:
    """Seeded input ids for ``tiny_bert`` with the first row padded after 5 tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}
