import torch
import transformers
from torch import nn

from effnlp_ext.elue.multi_exit import MultiExitBert
from effnlp_ext.training.heads import start_at_label_mean


def _config(num_labels: int) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=32, num_labels=num_labels)


def test_regression_head_starts_at_the_label_mean():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config(1))
    weight = model.classifier.weight.detach().clone()
    assert start_at_label_mean(model, [1.0, 2.5, 5.0, 3.5]) == 3.0
    assert torch.equal(model.classifier.bias, torch.tensor([3.0]))
    assert torch.equal(model.classifier.weight, weight)          # only the bias moves
    ids = torch.randint(1, 50, (4, 6))
    model.classifier.weight.data.zero_()
    torch.testing.assert_close(model(input_ids=ids).logits, torch.full((4, 1), 3.0))


def test_classification_heads_and_empty_labels_are_left_alone():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config(3))
    before = model.classifier.bias.detach().clone()
    assert start_at_label_mean(model, [0, 1, 2, 2]) is None
    assert torch.equal(model.classifier.bias, before)
    regression = transformers.BertForSequenceClassification(_config(1))
    assert start_at_label_mean(regression, []) is None
    assert start_at_label_mean(nn.Linear(3, 1), [1.0]) is None   # not named *classifier


def test_every_multi_exit_regression_head():
    torch.manual_seed(0)
    model = MultiExitBert(transformers.BertModel(_config(1)), 1)
    assert start_at_label_mean(model, torch.tensor([2.0, 4.0])) == 3.0
    assert [e.classifier.bias.item() for e in model.exits] == [3.0, 3.0]
