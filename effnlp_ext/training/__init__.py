"""Shared training core: the trainer (DDP, AMP, checkpoint/resume, JSON-lines metrics)."""
from .trainer import (TrainConfig, Trainer, default_step, linear_warmup_decay, optimizer_groups,
                      param_groups, remove_run_state, set_seed)
