"""KroneckerBERT recipe settings: the preset, the preset as a rank-R sum, a searched CF."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from effnlp_ext.kronecker import KronLinear
from effnlp_ext.kronecker.recipe import compress_student


def _teacher():
    cfg = BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=16)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def test_preset_rank_sum_halves_the_compression_and_fits_closer():
    teacher = _teacher()
    one = compress_student(teacher, "kroneckerbert")
    two = compress_student(teacher, "kroneckerbert:2")
    k1 = [m for m in one.modules() if isinstance(m, KronLinear)]
    k2 = [m for m in two.modules() if isinstance(m, KronLinear)]
    assert len(k1) == len(k2) == 12 and all(m.rank == 1 for m in k1)
    assert all(m.rank == 2 and m.shapes == n.shapes for m, n in zip(k2, k1))
    assert two.kron_report["cf_layers"] == pytest.approx(one.kron_report["cf_layers"] / 2)
    x = torch.randint(0, 40, (3, 7))
    ref = teacher(x).logits
    err1 = (one(x).logits - ref).norm()
    err2 = (two(x).logits - ref).norm()
    assert err2 < err1                         # a rank-2 nearest Kronecker sum fits closer
    assert not any(isinstance(m, KronLinear) for m in teacher.modules())   # teacher untouched


@pytest.mark.parametrize("bad", ["kroneckerbert:0", "kroneckerbert:x", "eight", ""])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="setting|rank"):
        compress_student(_teacher(), bad)
