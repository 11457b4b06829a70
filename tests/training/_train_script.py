"""Train a tiny MLP on fixed random data with the shared Trainer (used by the trainer tests).

Run directly, under ``torchrun``, or killed and relaunched with ``--resume``; writes the final
parameters to ``--final`` (rank 0).
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from torch import nn

from effnlp_ext.training import TrainConfig, Trainer


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, n_classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def make_data(n: int = 64, d_in: int = 8, seed: int = 1234) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    labels = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    return [{"x": x[i], "labels": labels[i]} for i in range(n)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--final", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to be killable)")
    ap.add_argument("--n-data", type=int, default=64)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = TinyMLP(dropout=args.dropout)

    def step_fn(m, batch):
        if args.sleep:
            time.sleep(args.sleep)
        out = m(**batch)
        return out.loss, {"logit_mean": float(out.logits.detach().mean())}

    config = TrainConfig(lr=1e-2, weight_decay=0.01, warmup_steps=3, max_steps=args.steps,
                         batch_size=args.batch_size, grad_accum_steps=args.accum,
                         save_every=args.save_every, log_every=1, seed=7, output_dir=args.out,
                         max_grad_norm=1.0, progress=False, device="cpu")
    with Trainer(model, config, train_dataset=make_data(args.n_data), step_fn=step_fn) as trainer:
        trainer.train(resume=args.resume)
        if trainer.is_main:
            torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, args.final)


if __name__ == "__main__":
    main()
