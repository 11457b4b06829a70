"""Shared fixtures of the KroneckerBERT tests: seeding and a tiny random BERT config."""
import pytest
import torch
import transformers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=100)


@pytest.fixture
def tiny_batch():
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}
