"""The one training loop every method uses (fine-tuning, distillation, mask/prompt/adapter tuning).

Features: AdamW with no weight decay on biases and norm weights, linear warmup then linear decay,
gradient accumulation, gradient clipping, periodic evaluation with best-checkpoint selection,
metrics as JSON lines, tqdm progress, atomic checkpoints that survive a kill, DDP through
``torch.distributed`` when launched by ``torchrun``, and autocast (bf16/fp16) on CUDA.

Checkpoints (``checkpoint.pt``, ``best/model.pt``) hold the trainable parameters and the buffers;
frozen parameters (``requires_grad=False``: the backbone under prompt, adapter or mask tuning)
are left out, and a digest of them is kept so that resuming onto other frozen weights is refused.
A 20-token prompt's best model is then 36 KB, not 91 MB; ``save_frozen=True``
writes whole state dicts.

Data order is deterministic: epoch ``e`` shuffles with a generator seeded by ``seed + e``
(``DistributedSampler`` semantics, also with one process), or calls ``set_epoch(e)`` on a
user batch sampler; a resumed run skips the batches its checkpoint already consumed. With
``world_size`` processes and per-rank batch ``b``, the union of the ranks' batches at a step is
the single-process batch of size ``world_size * b`` at that step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, default_collate

StepFn = Callable[[nn.Module, Any], Any]
CHECKPOINT_NAME = "checkpoint.pt"
BEST_DIR, BEST_MODEL = "best", "model.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one run. Steps count optimizer updates."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0          # used when warmup_steps == 0
    max_steps: int | None = None       # wins over epochs when set
    epochs: float = 1.0
    batch_size: int = 32               # per process
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0  # None or <= 0: no clipping
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    eval_every: int = 0                # 0: only at the end (when an evaluator is given)
    save_every: int = 0                # 0: only at the end
    log_every: int = 10
    seed: int = 42
    output_dir: str | None = None
    metric_for_best: str | None = None
    greater_is_better: bool = True
    drop_last: bool = False
    num_workers: int = 0
    progress: bool = True
    amp: str | None = None             # None, "bf16" or "fp16"; ignored on CPU
    device: str | None = None          # default: cuda:LOCAL_RANK when available, else cpu
    ddp_find_unused_parameters: bool = False
    sparse_lr: float | None = None     # SparseAdam's lr for sparse-gradient tables (default: lr)
    lr_mults: dict[str, float] | None = None  # parameter-name suffix -> lr multiple: see optimizer_groups
    save_frozen: bool = False          # True: checkpoints also hold the frozen parameters

    def __post_init__(self):
        if self.grad_accum_steps < 1 or self.batch_size < 1:
            raise ValueError("grad_accum_steps and batch_size must be positive")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over ``warmup_steps``, then 1 -> 0 linearly at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters whose gradients are sparse: ``model.sparse_parameters()`` when the model
    declares them (e.g. the DAN's n-gram table), plus ``nn.Embedding``/``nn.EmbeddingBag``
    weights built with ``sparse=True``. They are trained by SparseAdam, not AdamW."""
    found: dict[int, nn.Parameter] = {}
    declared = getattr(model, "sparse_parameters", None)
    if callable(declared):
        found.update({id(p): p for p in declared()})
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse:
            found[id(m.weight)] = m.weight
    return [p for p in found.values() if p.requires_grad]


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()
                 ) -> list[dict]:
    """Trainable parameters split into decayed and not decayed (biases, norm weights, 1-D),
    leaving out the parameters whose ``id`` is in ``exclude``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        lowered = name.lower()
        if p.ndim < 2 or lowered.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def optimizer_groups(model: nn.Module, config: TrainConfig, exclude: set[int] = frozenset()
                     ) -> list[dict]:
    """AdamW's groups: ``param_groups`` and, for each multiple ``m != 1`` of
    ``config.lr_mults``, one group at ``lr * m`` without weight decay holding the parameters whose
    name ends with a suffix mapped to ``m`` (a multiple of 1 leaves them in the shared groups).
    The schedule scales every group alike, from its own lr."""
    mults = config.lr_mults or {}
    own: dict[float, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        mult = next((m for suffix, m in mults.items() if name.endswith(suffix)), 1.0)
        if mult != 1.0:
            own.setdefault(mult, []).append(p)
    ids = {id(p) for ps in own.values() for p in ps}
    groups = param_groups(model, config.weight_decay, set(exclude) | ids)
    return groups + [{"params": ps, "weight_decay": 0.0, "lr": config.lr * m} for m, ps in own.items()]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_step(model: nn.Module, batch: Any) -> torch.Tensor:
    """HF convention: the model takes the batch as keywords and returns ``.loss``."""
    return model(**batch).loss


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def remove_run_state(root: str | os.PathLike) -> int:
    """Deletes the resume checkpoints (``checkpoint.pt``) and best-model copies
    (``best/model.pt``) of the finished runs under ``root``; their metrics stay. For caches whose
    runs have exported their models: a run cannot be resumed afterwards. Returns bytes freed."""
    freed = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == CHECKPOINT_NAME or (name == BEST_MODEL
                                           and os.path.basename(dirpath) == BEST_DIR):
                path = os.path.join(dirpath, name)
                freed += os.path.getsize(path)
                os.remove(path)
    return freed


def frozen_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters that do not require grad, by state-dict key (tied names included),
    in key order."""
    state = model.state_dict(keep_vars=True)
    return {k: state[k].detach() for k in sorted(state)
            if isinstance(state[k], nn.Parameter) and not state[k].requires_grad}


def frozen_digest(frozen: Mapping[str, torch.Tensor]) -> str:
    """CRC-32 over the names, shapes, dtypes and bytes of ``frozen_parameters(model)``."""
    crc = 0
    for name, t in frozen.items():
        crc = zlib.crc32(f"{name}|{tuple(t.shape)}|{t.dtype};".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train ``model`` with ``config``.

    Data: either ``train_dataset`` (map-style) with ``collate_fn`` (default ``default_collate``)
    and optionally a ``batch_sampler`` (an iterable of index lists with ``set_epoch``, e.g.
    ``LengthBucketBatchSampler``; under DDP its batches are dealt round-robin to ranks), or a
    ready ``train_loader`` (its sampler's ``set_epoch`` is called; exact resume needs its order to
    depend on the epoch only).

    Step: ``step_fn(model, batch)`` returns a loss tensor or ``(loss, {name: float})``; the default
    is ``model(**batch).loss``. Under DDP ``model`` is the DDP wrapper (call it to get gradient
    synchronisation); ``trainer.model`` is always the bare module.

    Evaluation: ``eval_fn(model) -> {name: value}``, or ``eval_loader`` + ``metric_fn(logits,
    labels) -> {name: value}`` (logits from ``model(**batch).logits``, labels from
    ``batch["labels"]``; ``eval_loss`` is added when the model returns a loss). It runs on rank 0
    under ``torch.no_grad`` in eval mode.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, train_dataset=None,
                 collate_fn: Callable | None = None, batch_sampler: Iterable | None = None,
                 train_loader: DataLoader | None = None, eval_fn: Callable | None = None,
                 eval_loader: Iterable | None = None, metric_fn: Callable | None = None,
                 step_fn: StepFn | None = None):
        if (train_dataset is None) == (train_loader is None):
            raise ValueError("give exactly one of train_dataset or train_loader")
        if eval_loader is not None and metric_fn is None:
            raise ValueError("eval_loader needs a metric_fn")
        self.config = config
        self.train_dataset, self.collate_fn = train_dataset, collate_fn or default_collate
        self.batch_sampler, self.train_loader = batch_sampler, train_loader
        self.eval_fn, self.eval_loader, self.metric_fn = eval_fn, eval_loader, metric_fn
        self.step_fn = step_fn or default_step

        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self._owns_process_group = False
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
            dist.init_process_group(backend=backend)
            self._owns_process_group = True
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if config.device is not None:
            self.device = torch.device(config.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        self.model = model.to(self.device)
        self.wrapped: nn.Module = self.model
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(
                self.model, device_ids=ids,
                find_unused_parameters=config.ddp_find_unused_parameters)

        self.batches_per_epoch = self._count_batches()
        if config.max_steps is not None:
            self.total_steps = int(config.max_steps)
        else:
            self.total_steps = int(config.epochs * self.batches_per_epoch) // config.grad_accum_steps
        if self.total_steps < 1:
            raise ValueError("nothing to train: total optimizer steps is 0")
        warmup = config.warmup_steps or int(math.ceil(config.warmup_ratio * self.total_steps))
        self.warmup_steps = warmup
        # Sparse-gradient tables go to SparseAdam (AdamW rejects sparse gradients), everything
        # else to AdamW; both follow the same warmup/decay schedule.
        sparse = sparse_parameters(self.model)
        self.sparse_params = sparse
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.model, config, {id(p) for p in sparse}),
            lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_warmup_decay(warmup, self.total_steps))
        self.sparse_optimizer = self.sparse_scheduler = None
        if sparse:
            self.sparse_optimizer = torch.optim.SparseAdam(
                sparse, lr=config.sparse_lr if config.sparse_lr is not None else config.lr,
                betas=config.adam_betas, eps=config.adam_eps)
            self.sparse_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.sparse_optimizer, linear_warmup_decay(warmup, self.total_steps))
        use_amp = config.amp is not None and self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp) \
            if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        # position: optimizer steps done, next batch to consume
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self._digest: str | None = None

    # ----------------------------------------------------------------------------- data
    def _count_batches(self) -> int:
        if self.train_loader is not None:
            n = len(self.train_loader)
        else:
            n = len(self._epoch_batches(0))
        if n < 1:
            raise ValueError("the training data gives no batch per epoch")
        return n

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's index batches of ``epoch`` (deterministic in ``seed`` and ``epoch``)."""
        if self.batch_sampler is not None:
            if hasattr(self.batch_sampler, "set_epoch"):
                self.batch_sampler.set_epoch(epoch)
            batches = [list(b) for b in self.batch_sampler]
            usable = len(batches) // self.world_size * self.world_size
            return batches[self.rank:usable:self.world_size]
        sampler = DistributedSampler(self.train_dataset, num_replicas=self.world_size,
                                     rank=self.rank, shuffle=True, seed=self.config.seed,
                                     drop_last=self.config.drop_last)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        b = self.config.batch_size
        batches = [indices[i:i + b] for i in range(0, len(indices), b)]
        if self.config.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        return batches

    def _epoch_iter(self, epoch: int, start: int):
        if self.train_loader is not None:
            for holder in (self.train_loader.sampler, self.train_loader.batch_sampler):
                if hasattr(holder, "set_epoch"):
                    holder.set_epoch(epoch)
            with torch.random.fork_rng(devices=[]):  # iter() must not move the global RNG
                it = iter(self.train_loader)
            for _ in range(start):
                next(it)
            return it
        batches = self._epoch_batches(epoch)[start:]
        # a private generator keeps DataLoader from drawing on the global RNG (resume exactness)
        return iter(DataLoader(self.train_dataset, batch_sampler=batches,
                               collate_fn=self.collate_fn, num_workers=self.config.num_workers,
                               generator=torch.Generator().manual_seed(self.config.seed + epoch),
                               pin_memory=self.device.type == "cuda"))

    # ----------------------------------------------------------------------------- checkpoints
    def _path(self, *parts: str) -> str:
        return os.path.join(self.config.output_dir, *parts)

    def model_state(self) -> dict:
        """What checkpoints store of the model: its state dict without the frozen parameters
        (all of it with ``save_frozen``)."""
        state = self.model.state_dict()
        if self.config.save_frozen:
            return state
        frozen = frozen_parameters(self.model)
        return {k: v for k, v in state.items() if k not in frozen}

    def _frozen_digest(self) -> str | None:
        """Digest of the frozen parameters (computed once: the trainer never changes them)."""
        if self.config.save_frozen:
            return None
        if self._digest is None:
            self._digest = frozen_digest(frozen_parameters(self.model))
        return self._digest

    def load_model_state(self, state: Mapping[str, torch.Tensor],
                         digest: str | None = None) -> None:
        """Loads a ``model_state()`` into the model. Keys it lacks must be frozen parameters of
        the model, and ``digest`` (when given) must match them: a checkpoint trained against
        other frozen weights is refused rather than combined with these."""
        # checked before anything is loaded: a refused checkpoint leaves the model as it was
        own = self.model.state_dict()
        frozen = frozen_parameters(self.model)
        missing = [k for k in own if k not in state]
        not_frozen = [k for k in missing if k not in frozen]
        unexpected = [k for k in state if k not in own]
        if unexpected or not_frozen:
            raise RuntimeError(
                f"checkpoint does not fit the model: it lacks {not_frozen[:5]} (trainable in "
                f"the model) and has unexpected keys {unexpected[:5]}")
        if missing and digest is not None and digest != frozen_digest(frozen):
            raise RuntimeError(
                "checkpoint was trained against other frozen weights (their digest differs); "
                "rebuild the model the run started from before resuming or loading it")
        self.model.load_state_dict(state, strict=False)

    def save_checkpoint(self) -> None:
        if not self.is_main or self.config.output_dir is None:
            return
        state = {"model": self.model_state(), "frozen_digest": self._frozen_digest(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "best_metric": self.best_metric, "best_step": self.best_step,
                 "rng": _rng_state(), "config": asdict(self.config)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.sparse_optimizer is not None:
            state["sparse_optimizer"] = self.sparse_optimizer.state_dict()
            state["sparse_scheduler"] = self.sparse_scheduler.state_dict()
        _atomic_torch_save(state, self._path(CHECKPOINT_NAME))

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint of ``output_dir`` (all ranks read it); False if none."""
        if self.config.output_dir is None:
            return False
        path = self._path(CHECKPOINT_NAME)
        if not os.path.exists(path):
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.load_model_state(state["model"], state.get("frozen_digest"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
            self.sparse_scheduler.load_state_dict(state["sparse_scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        _set_rng_state(state["rng"])
        if self.is_main:
            self._truncate_metrics(self.step)
        return True

    def _save_best(self, metrics: dict) -> None:
        os.makedirs(self._path(BEST_DIR), exist_ok=True)
        _atomic_torch_save(self.model_state(), self._path(BEST_DIR, BEST_MODEL))
        record = {"step": self.step, "metric": self.config.metric_for_best,
                  "value": self.best_metric, "metrics": metrics,
                  "frozen_digest": self._frozen_digest()}
        _atomic_write_text(json.dumps(record, indent=2), self._path(BEST_DIR, "metric.json"))

    def load_best(self) -> dict:
        """Puts the best checkpoint's weights into the model; returns its record (step, metric,
        value, metrics) from ``best/metric.json``."""
        if self.config.output_dir is None or not os.path.exists(self._path(BEST_DIR, BEST_MODEL)):
            raise FileNotFoundError(
                f"no best checkpoint under {self.config.output_dir!r}: it needs output_dir, "
                "metric_for_best and an evaluator")
        with open(self._path(BEST_DIR, "metric.json")) as f:
            record = json.load(f)
        state = torch.load(self._path(BEST_DIR, BEST_MODEL), map_location="cpu")
        self.load_model_state(state, record.get("frozen_digest"))
        return record

    # ----------------------------------------------------------------------------- logging
    def log(self, record: dict) -> None:
        if not self.is_main or self.config.output_dir is None:
            return
        with open(self._path(METRICS_NAME), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint (they will be redone)."""
        path = self._path(METRICS_NAME)
        if not os.path.exists(path):
            return
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        _atomic_write_text("".join(kept), path)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None and self.eval_loader is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), self._autocast():
                if self.eval_fn is not None:
                    metrics = dict(self.eval_fn(self.model))
                else:
                    metrics = self._eval_loop()
        finally:
            self.model.train(was_training)
        return {k: float(v) for k, v in metrics.items()}

    def _eval_loop(self) -> dict[str, float]:
        logits, labels, losses = [], [], []
        for batch in self.eval_loader:
            batch = to_device(batch, self.device)
            out = self.model(**batch)
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
            if getattr(out, "loss", None) is not None:
                losses.append(float(out.loss))
        metrics = dict(self.metric_fn(torch.cat(logits), torch.cat(labels)))
        if losses:
            metrics["eval_loss"] = sum(losses) / len(losses)
        return metrics

    def _is_better(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.config.greater_is_better else value < self.best_metric

    def _run_eval(self) -> None:
        if self.is_main:
            metrics = self.evaluate()
            if metrics:
                self.log({"type": "eval", "step": self.step, "epoch": self.epoch, **metrics})
                key = self.config.metric_for_best
                if key is not None:
                    if key not in metrics:
                        raise KeyError(f"metric_for_best {key!r} not in {sorted(metrics)}")
                    if self._is_better(metrics[key]):
                        self.best_metric, self.best_step = metrics[key], self.step
                        if self.config.output_dir is not None:
                            self._save_best(metrics)
        if self.distributed:
            dist.barrier()

    # ----------------------------------------------------------------------------- training
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _optimizer_step(self) -> None:
        clip = self.config.max_grad_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip is not None and clip > 0:
            sparse = {id(p) for p in self.sparse_params}
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if id(p) not in sparse], clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:
            from .._ops.ngram_bag import restore_coalesced_flag

            for p in self.sparse_params:   # skip SparseAdam's re-coalescing of coalesced grads
                restore_coalesced_flag(p)
            self.sparse_optimizer.step()
            self.sparse_scheduler.step()
            self.sparse_optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run to ``total_steps``; with ``resume`` continue from ``output_dir``'s checkpoint."""
        cfg = self.config
        if self.is_main and cfg.output_dir is not None:
            os.makedirs(cfg.output_dir, exist_ok=True)
        set_seed(cfg.seed)
        resumed = self.load_checkpoint() if resume else False
        if self.is_main and cfg.output_dir is not None and not resumed:
            open(self._path(METRICS_NAME), "w").close()
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.zero_grad(set_to_none=True)
        accum, micro = cfg.grad_accum_steps, 0
        window: dict[str, list[float]] = {}
        try:
            while self.step < self.total_steps:
                for batch in self._epoch_iter(self.epoch, self.batch_in_epoch):
                    self.batch_in_epoch += 1
                    micro += 1
                    sync = micro % accum == 0
                    no_sync = self.distributed and not sync
                    with (self.wrapped.no_sync() if no_sync else contextlib.nullcontext()):
                        with self._autocast():
                            out = self.step_fn(self.wrapped, to_device(batch, self.device))
                        loss, extra = out if isinstance(out, tuple) else (out, {})
                        scaled = loss / accum
                        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    window.setdefault("loss", []).append(float(loss.detach()))
                    for k, v in extra.items():
                        window.setdefault(k, []).append(float(v))
                    if not sync:
                        continue
                    lr = self.scheduler.get_last_lr()[0]
                    self._optimizer_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{window['loss'][-1]:.4f}", refresh=False)
                    if cfg.log_every and self.step % cfg.log_every == 0:
                        self.log({"type": "train", "step": self.step, "epoch": self.epoch,
                                  "lr": lr, **{k: sum(v) / len(v) for k, v in window.items()}})
                        window = {}
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._run_eval()
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    continue
                break
            if not cfg.eval_every or self.step % cfg.eval_every != 0:
                self._run_eval()
            self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        result = {"step": self.step, "epoch": self.epoch, "best_metric": self.best_metric,
                  "best_step": self.best_step}
        return result

    def close(self) -> None:
        """Tear down the process group this trainer started (call once, at the end)."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
