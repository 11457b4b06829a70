"""Trainer unit tests: LR schedule, gradient accumulation, best checkpoint, JSON-lines metrics."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from effnlp_ext.training import (TrainConfig, Trainer, linear_warmup_decay, param_groups,
                                 remove_run_state)

_spec = importlib.util.spec_from_file_location(
    "_train_script", Path(__file__).with_name("_train_script.py"))
_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_script)
TinyMLP, make_data = _script.TinyMLP, _script.make_data


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(lr=1e-2, max_steps=6, batch_size=4, seed=3, output_dir=str(tmp_path),
                progress=False, device="cpu", log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_linear_warmup_decay_shape():
    f = linear_warmup_decay(4, 10)
    values = [f(s) for s in range(11)]
    expected = [0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
    assert values == pytest.approx(expected)


def test_trainer_lr_follows_warmup_then_decay(tmp_path):
    cfg = _config(tmp_path, max_steps=10, warmup_ratio=0.2, lr=0.1)
    trainer = Trainer(TinyMLP(dropout=0.0), cfg, train_dataset=make_data(32))
    assert trainer.warmup_steps == 2
    trainer.train()
    lrs = [r["lr"] for r in _read_jsonl(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    # lr used by update s (1-based) is the schedule at s - 1
    expected = [0.1 * linear_warmup_decay(2, 10)(s) for s in range(10)]
    assert lrs == pytest.approx(expected)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_param_groups_exclude_bias_and_layernorm():
    model = TinyMLP()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.net[0].weight), id(model.net[4].weight)}
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias


def test_grad_accumulation_matches_larger_batch(tmp_path):
    def run(batch_size, accum, sub):
        torch.manual_seed(0)
        model = TinyMLP(dropout=0.0)
        cfg = _config(tmp_path / sub, batch_size=batch_size, grad_accum_steps=accum, max_steps=5,
                      weight_decay=0.01, warmup_steps=1)
        Trainer(model, cfg, train_dataset=make_data(64)).train()
        return model.state_dict()

    big, accumulated = run(8, 1, "big"), run(4, 2, "accum")
    diff = max((big[k] - accumulated[k]).abs().max().item() for k in big)
    assert diff < 1e-6, diff


def test_epochs_count_optimizer_steps(tmp_path):
    cfg = _config(tmp_path, max_steps=None, epochs=2, batch_size=4, grad_accum_steps=2)
    trainer = Trainer(TinyMLP(), cfg, train_dataset=make_data(30))  # 8 batches per epoch
    assert trainer.batches_per_epoch == 8 and trainer.total_steps == 8
    out = trainer.train()
    assert out["step"] == 8


@pytest.mark.parametrize("greater, best_call", [(True, 1), (False, 0)])
def test_best_checkpoint_keeps_best_metric(tmp_path, greater, best_call):
    scores = iter([0.5, 0.9, 0.7, 0.8])
    snapshots = []

    def eval_fn(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"acc": next(scores), "other": 1.0}

    cfg = _config(tmp_path, max_steps=8, eval_every=2, metric_for_best="acc",
                  greater_is_better=greater)
    out = Trainer(TinyMLP(), cfg, train_dataset=make_data(32), eval_fn=eval_fn).train()
    assert len(snapshots) == 4  # steps 2, 4, 6, 8; no extra eval at the end
    assert out["best_step"] == 2 * (best_call + 1)
    assert out["best_metric"] == [0.5, 0.9][best_call]
    record = json.loads((tmp_path / "best" / "metric.json").read_text())
    assert record["step"] == out["best_step"] and record["metric"] == "acc"
    assert record["value"] == out["best_metric"] and record["metrics"]["other"] == 1.0
    best = torch.load(tmp_path / "best" / "model.pt")
    for k, v in snapshots[best_call].items():
        torch.testing.assert_close(best[k], v, rtol=0, atol=0)


def test_metrics_jsonl_records(tmp_path):
    data = make_data(32)
    loader = torch.utils.data.DataLoader(data[:16], batch_size=8)

    def accuracy(logits, labels):
        return {"accuracy": (logits.argmax(-1) == labels).float().mean().item()}

    cfg = _config(tmp_path, max_steps=6, log_every=2, eval_every=3)
    Trainer(TinyMLP(), cfg, train_dataset=data, eval_loader=loader, metric_fn=accuracy).train()
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all({"loss", "lr", "epoch"} <= r.keys() and r["loss"] > 0 for r in train)
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 <= r["accuracy"] <= 1 and r["eval_loss"] > 0 for r in evals)
    assert (tmp_path / "checkpoint.pt").exists()  # end-of-run checkpoint


def test_custom_step_fn_logs_extra_values(tmp_path):
    def step_fn(model, batch):
        out = model(**batch)
        return out.loss * 2, {"half": float(out.loss.detach())}

    cfg = _config(tmp_path, max_steps=3)
    Trainer(TinyMLP(dropout=0.0), cfg, train_dataset=make_data(16), step_fn=step_fn).train()
    for r in _read_jsonl(tmp_path / "metrics.jsonl"):
        assert r["loss"] == pytest.approx(2 * r["half"])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError):
        TrainConfig(amp="int8")


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("source", ["dataset", "loader"])
def test_resume_after_crash_with_accumulation_and_eval(tmp_path, source):
    """Crash mid-run (accumulation crossing epoch ends, dropout, eval) and resume in-process."""
    data = make_data(20)

    def train_data():
        if source == "dataset":
            return {"train_dataset": data}
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=5)
        return {"train_loader": torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)}

    def run(out, crash_at=None, resume=False):
        torch.manual_seed(0)
        model = TinyMLP(dropout=0.2)
        calls = {"n": 0}

        def step_fn(m, batch):
            calls["n"] += 1
            if crash_at is not None and calls["n"] == crash_at:
                raise _Crash
            return m(**batch).loss

        def eval_fn(m):
            return {"w": m.net[0].weight.sum().item()}

        cfg = _config(out, batch_size=4, grad_accum_steps=2, max_steps=12, save_every=2,
                      eval_every=3, metric_for_best="w", warmup_steps=2)
        trainer = Trainer(model, cfg, **train_data(), step_fn=step_fn,
                          eval_fn=eval_fn)  # 5 batches per epoch: accumulation spans epochs
        return trainer, trainer.train(resume=resume)

    ref, ref_out = run(tmp_path / "ref")
    with pytest.raises(_Crash):
        run(tmp_path / "run", crash_at=16)  # after step 7; the last checkpoint is step 6
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 6
    resumed, out = run(tmp_path / "run", resume=True)
    assert out == ref_out
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-6)
    assert _read_jsonl(tmp_path / "run" / "metrics.jsonl") == _read_jsonl(
        tmp_path / "ref" / "metrics.jsonl")
    assert json.loads((tmp_path / "run" / "best" / "metric.json").read_text()) == json.loads(
        (tmp_path / "ref" / "best" / "metric.json").read_text())


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_autocast_trains_and_resumes(tmp_path, amp):
    cfg = _config(tmp_path, max_steps=4, save_every=2, amp=amp, device="cuda")
    trainer = Trainer(TinyMLP(), cfg, train_dataset=make_data(32))
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    trainer.train()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and ("scaler" in state) == (amp == "fp16")
    assert all(math.isfinite(r["loss"]) for r in _read_jsonl(tmp_path / "metrics.jsonl")
               if r["type"] == "train")
    again = Trainer(TinyMLP(), cfg, train_dataset=make_data(32))
    assert again.train(resume=True)["step"] == 4


def test_cpu_ignores_amp(tmp_path):
    trainer = Trainer(TinyMLP(), _config(tmp_path, amp="bf16"), train_dataset=make_data(16))
    assert trainer.amp_dtype is None and trainer.scaler is None


class _BagClassifier(torch.nn.Module):
    """A sparse-gradient table (EmbeddingBag, sparse=True) under a dense head."""

    def __init__(self):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(50, 8, mode="mean", sparse=True)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, ids, labels):
        logits = self.head(self.bag(ids))
        return torch.nn.functional.cross_entropy(logits, labels)


def _bag_data(n=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (n, 5), generator=g)
    return [{"ids": ids[i], "labels": (ids[i, 0] % 2)} for i in range(n)]


def test_sparse_tables_train_with_sparse_adam_and_resume(tmp_path):
    """Sparse-gradient tables go to SparseAdam (AdamW refuses them), are left out of clipping,
    and a crashed run resumes to the same parameters, SparseAdam state included."""
    data = _bag_data()

    def run(out, crash_at=None, resume=False):
        torch.manual_seed(0)
        model = _BagClassifier()
        calls = {"n": 0}

        def step_fn(m, batch):
            calls["n"] += 1
            if crash_at is not None and calls["n"] == crash_at:
                raise _Crash
            return m(**batch)

        cfg = _config(out, max_steps=9, save_every=3, sparse_lr=5e-2, max_grad_norm=0.5)
        trainer = Trainer(model, cfg, train_dataset=data, step_fn=step_fn)
        return trainer, trainer.train(resume=resume)

    ref, _ = run(tmp_path / "ref")
    assert isinstance(ref.sparse_optimizer, torch.optim.SparseAdam)
    assert ref.sparse_params == [ref.model.bag.weight]
    assert all(p is not ref.model.bag.weight for g in ref.optimizer.param_groups for p in g["params"])
    assert ref.sparse_optimizer.param_groups[0]["lr"] < 5e-2  # follows the decay schedule
    torch.manual_seed(0)
    init = _BagClassifier()
    assert not torch.equal(init.bag.weight, ref.model.bag.weight)
    with pytest.raises(_Crash):
        run(tmp_path / "run", crash_at=5)
    resumed, _ = run(tmp_path / "run", resume=True)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-6)


def _frozen_first_layer(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    model = TinyMLP(dropout=0.0)
    model.net[0].requires_grad_(False)      # a frozen "backbone" layer
    model.register_buffer("step_count", torch.zeros(()))   # buffers are kept
    return model


def _neg_square_eval(model):
    x = torch.stack([d["x"] for d in make_data(16, seed=7)])
    return {"neg_loss": -float(model.net(x).square().mean())}


def test_checkpoints_leave_frozen_parameters_out(tmp_path):
    model = _frozen_first_layer()
    cfg = _config(tmp_path, max_steps=4, eval_every=2, metric_for_best="neg_loss")
    trainer = Trainer(model, cfg, train_dataset=make_data(32), eval_fn=_neg_square_eval)
    trainer.train()
    frozen = {"net.0.weight", "net.0.bias"}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    best = torch.load(tmp_path / "best" / "model.pt")
    assert set(ckpt["model"]) == set(best) == set(model.state_dict()) - frozen
    assert "step_count" in best
    digest = json.loads((tmp_path / "best" / "metric.json").read_text())["frozen_digest"]
    assert digest == ckpt["frozen_digest"] and len(digest) == 8

    # the best state goes back into a model rebuilt the same way, frozen layer untouched
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = _frozen_first_layer()
    again = Trainer(rebuilt, cfg, train_dataset=make_data(32), eval_fn=_neg_square_eval)
    record = again.load_best()
    assert record["step"] == trainer.best_step and record["metric"] == "neg_loss"
    for k in frozen:
        torch.testing.assert_close(rebuilt.state_dict()[k], trained[k], rtol=0, atol=0)
    for k in best:
        torch.testing.assert_close(rebuilt.state_dict()[k], best[k], rtol=0, atol=0)

    # save_frozen: whole state dicts, no digest
    full = _config(tmp_path / "full", max_steps=2, save_frozen=True)
    Trainer(_frozen_first_layer(), full, train_dataset=make_data(32)).train()
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    assert set(ckpt["model"]) == set(model.state_dict()) and ckpt["frozen_digest"] is None


def test_resume_refuses_other_frozen_weights(tmp_path):
    cfg = _config(tmp_path, max_steps=6, save_every=2)
    Trainer(_frozen_first_layer(), cfg, train_dataset=make_data(32)).train()
    # same frozen weights: resumes (nothing left to do) and restores the trained layers
    same = _frozen_first_layer()
    Trainer(same, cfg, train_dataset=make_data(32)).train(resume=True)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    torch.testing.assert_close(same.net[4].weight, ckpt["model"]["net.4.weight"], rtol=0, atol=0)
    # another backbone under the same trainable layers: refused, not silently combined
    other = _frozen_first_layer(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match="other frozen weights"):
        Trainer(other, cfg, train_dataset=make_data(32)).train(resume=True)
    for k, v in other.state_dict().items():   # refused before anything was loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # a layer frozen when the checkpoint was written but trainable now has no saved value
    unfrozen = _frozen_first_layer()
    unfrozen.net[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"lacks \['net.0.weight', 'net.0.bias'\]"):
        Trainer(unfrozen, cfg, train_dataset=make_data(32)).train(resume=True)


def test_load_best_needs_a_best_checkpoint(tmp_path):
    trainer = Trainer(TinyMLP(), _config(tmp_path, max_steps=2), train_dataset=make_data(8))
    trainer.train()
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        trainer.load_best()


def test_remove_run_state_keeps_metrics(tmp_path):
    cfg = _config(tmp_path / "run", max_steps=4, eval_every=2, metric_for_best="neg_loss")
    Trainer(TinyMLP(), cfg, train_dataset=make_data(32), eval_fn=_neg_square_eval).train()
    (tmp_path / "model.pt").write_bytes(b"an exported model, not a run's best copy")
    sizes = sum(p.stat().st_size for p in [tmp_path / "run" / "checkpoint.pt",
                                          tmp_path / "run" / "best" / "model.pt"])
    assert remove_run_state(tmp_path) == sizes
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["model.pt", "run/best/metric.json", "run/metrics.jsonl"]
