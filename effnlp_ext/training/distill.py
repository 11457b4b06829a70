"""Knowledge-distillation losses (TinyBERT / KroneckerBERT two-stage recipe).

Stage 1 (:class:`IntermediateKD`) matches the student's embedding output, per-layer
pre-softmax attention scores ``QK^T/sqrt(d)`` and per-layer FFN (block) outputs to the
teacher's, over a :class:`LayerMap`. Stage 2 (:class:`PredictionKD`) matches the logits
(temperature-softened KL, or MSE for regression heads), optionally plus the hard-label loss.

HF transformers 5 computes attention through an attention interface (eager / sdpa) and
``output_attentions`` returns post-softmax probabilities, so the scores are rebuilt here from
Q and K captured by forward hooks on each layer's ``attention.self.query`` / ``.key`` modules
(any module there works, e.g. a compressed linear).

Both stage callables have the signature ``(student, teacher, batch) -> (loss, logs)``;
``kd.bind(teacher)`` gives the ``step_fn(model, batch)`` form a trainer takes.
The teacher should be in ``eval()`` mode; it always runs under ``torch.no_grad()``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "logit_kd_loss", "hidden_mse_loss", "attention_score_loss", "LayerMap",
    "CapturedOutputs", "DistillationCapture", "capture_outputs", "IntermediateKD", "PredictionKD",
]

LABEL_KEYS = ("labels", "label")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half/bfloat16 upcast, float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- losses
def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0, mode: str = "kl") -> torch.Tensor:
    """Distillation loss on logits; the teacher side is detached.

    ``mode="kl"``: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over examples
    (``batchmean``; leading dims are flattened, so token-level logits work too).
    ``mode="mse"``: mean squared error on raw logits (regression heads, or the TinyBERT variant).
    One-column logits (a regression head) always take the MSE: a softmax over one class is
    constant, so its KL would be zero whatever the student predicts.
    """
    teacher_logits = teacher_logits.detach()
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit_kd_loss: shapes differ, student {tuple(student_logits.shape)} "
                         f"vs teacher {tuple(teacher_logits.shape)}")
    if mode not in ("kl", "mse"):
        raise ValueError(f"logit_kd_loss: mode must be 'kl' or 'mse', got {mode!r}")
    if mode == "mse" or student_logits.shape[-1] == 1:
        return F.mse_loss(_f32(student_logits), _f32(teacher_logits))
    if temperature <= 0:
        raise ValueError(f"logit_kd_loss: temperature must be > 0, got {temperature}")
    c = student_logits.shape[-1]
    log_s = F.log_softmax(_f32(student_logits.reshape(-1, c)) / temperature, dim=-1)
    log_t = F.log_softmax(_f32(teacher_logits.reshape(-1, c)) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, torch.Tensor):  # fixed (d_student, d_teacher) matrix
        return x @ projection.to(x.dtype)
    return projection(x)


def hidden_mse_loss(student: torch.Tensor, teacher: torch.Tensor,
                    attention_mask: torch.Tensor | None = None,
                    projection: nn.Module | torch.Tensor | None = None) -> torch.Tensor:
    """MSE between (B, L, D) hidden states, averaged over non-padding tokens and features.

    ``projection`` maps the student width to the teacher width when they differ: a module
    (e.g. a learned ``nn.Linear``) or a fixed ``(d_student, d_teacher)`` matrix.
    """
    student = _project(student, projection)
    teacher = teacher.detach()
    if student.shape != teacher.shape:
        raise ValueError(f"hidden_mse_loss: shapes differ, student {tuple(student.shape)} vs "
                         f"teacher {tuple(teacher.shape)} (pass a projection when widths differ)")
    sq = (_f32(student) - _f32(teacher)).pow(2)
    if attention_mask is None:
        return sq.mean()
    m = attention_mask.to(sq.dtype).unsqueeze(-1)  # (B, L, 1)
    denom = (m.sum() * sq.shape[-1]).clamp_min(1.0)
    return (sq * m).sum() / denom


def attention_score_loss(student: torch.Tensor, teacher: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between (B, H, L, L) pre-softmax scores over valid (query, key) pairs only."""
    teacher = teacher.detach()
    if student.shape != teacher.shape:
        raise ValueError(f"attention_score_loss: shapes differ, student {tuple(student.shape)} "
                         f"vs teacher {tuple(teacher.shape)} (head counts must match)")
    sq = (_f32(student) - _f32(teacher)).pow(2)
    if attention_mask is None:
        return sq.mean()
    m = attention_mask.to(sq.dtype)
    pair = (m[:, :, None] * m[:, None, :]).unsqueeze(1)  # (B, 1, Lq, Lk)
    denom = (pair.sum() * sq.shape[1]).clamp_min(1.0)
    return (sq * pair).sum() / denom


# ----------------------------------------------------------------------------- layer map
@dataclass(frozen=True)
class LayerMap:
    """Pairs ``(student_layer, teacher_layer)``, 0-based transformer layers."""
    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def uniform(cls, student_layers: int, teacher_layers: int) -> "LayerMap":
        """TinyBERT mapping: student layer i <-> teacher layer (i+1)*t//s - 1."""
        if not 0 < student_layers <= teacher_layers:
            raise ValueError(f"LayerMap.uniform: need 0 < student ({student_layers}) <= "
                             f"teacher ({teacher_layers}) layers")
        return cls(tuple((i, (i + 1) * teacher_layers // student_layers - 1)
                         for i in range(student_layers)))

    @classmethod
    def explicit(cls, mapping: Sequence[int] | Sequence[tuple[int, int]] | Mapping[int, int]
                 ) -> "LayerMap":
        """``[t0, t1, ...]`` (student i <-> teacher t_i), a list of pairs, or a dict."""
        if isinstance(mapping, Mapping):
            pairs = tuple((int(s), int(t)) for s, t in mapping.items())
        else:
            pairs = tuple((int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (i, int(p))
                          for i, p in enumerate(mapping))
        return cls(pairs)

    def check(self, student_layers: int, teacher_layers: int) -> None:
        for s, t in self.pairs:
            if not (0 <= s < student_layers and 0 <= t < teacher_layers):
                raise ValueError(f"LayerMap: pair ({s}, {t}) out of range for "
                                 f"{student_layers} student / {teacher_layers} teacher layers")

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


# ----------------------------------------------------------------------------- capture
@dataclass
class CapturedOutputs:
    """What one forward pass gives for distillation.

    ``embeddings``: (B, L, D) embedding output; ``hidden``: per-layer (B, L, D) block outputs;
    ``scores``: per-layer (B, H, L, L) pre-softmax ``QK^T/sqrt(d)`` (no mask added);
    ``logits``: the model's logits (None for a bare encoder).
    """
    embeddings: torch.Tensor | None
    hidden: list[torch.Tensor]
    scores: list[torch.Tensor]
    logits: torch.Tensor | None
    attention_mask: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return max(len(self.hidden), len(self.scores))


def _self_attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for name, m in model.named_modules()
            if name.endswith("attention.self") and hasattr(m, "query") and hasattr(m, "key")]
    if not mods:
        raise ValueError("DistillationCapture: no '*.attention.self' modules with query/key found")
    return mods


def _num_heads(module: nn.Module) -> int:
    h = getattr(module, "num_attention_heads", None)
    if h is None:
        h = module.config.num_attention_heads
    return int(h)


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its labels (the losses here handle labels themselves)."""
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


class DistillationCapture:
    """Context manager: Q/K hooks on every self-attention layer of ``model``.

    >>> with DistillationCapture(model) as cap:
    ...     out = cap.run(batch)            # CapturedOutputs
    """

    def __init__(self, model: nn.Module, scores: bool = True):
        self.model = model
        self.want_scores = scores
        self._handles: list = []
        self._q: dict[int, torch.Tensor] = {}
        self._k: dict[int, torch.Tensor] = {}
        self._layers = _self_attention_modules(model) if scores else []

    def __enter__(self) -> "DistillationCapture":
        for i, attn in enumerate(self._layers):
            self._handles.append(attn.query.register_forward_hook(self._store(self._q, i)))
            self._handles.append(attn.key.register_forward_hook(self._store(self._k, i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._q.clear()
        self._k.clear()

    @staticmethod
    def _store(buf: dict, i: int) -> Callable:
        def hook(_module, _inputs, output):
            buf[i] = output
        return hook

    def _scores(self) -> list[torch.Tensor]:
        out = []
        for i, attn in enumerate(self._layers):
            if i not in self._q or i not in self._k:
                raise RuntimeError(f"DistillationCapture: layer {i} query/key hook did not fire")
            q, k = self._q[i], self._k[i]
            h = _num_heads(attn)
            b, lq, _ = q.shape
            q = q.view(b, lq, h, -1).transpose(1, 2)            # (B, H, L, d)
            k = k.view(b, k.shape[1], h, -1).transpose(1, 2)
            out.append(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5)
        return out

    def run(self, batch: Mapping[str, torch.Tensor]) -> CapturedOutputs:
        self._q.clear()
        self._k.clear()
        out = self.model(**model_inputs(batch), output_hidden_states=True)
        hs = getattr(out, "hidden_states", None)
        if hs is None:
            raise RuntimeError("DistillationCapture: model returned no hidden_states")
        scores = self._scores() if self.want_scores else []
        self._q.clear()
        self._k.clear()
        return CapturedOutputs(embeddings=hs[0], hidden=list(hs[1:]), scores=scores,
                               logits=getattr(out, "logits", None),
                               attention_mask=batch.get("attention_mask"))


def capture_outputs(model: nn.Module, batch: Mapping[str, torch.Tensor], *,
                    no_grad: bool = False, scores: bool = True) -> CapturedOutputs:
    """One forward of ``model`` with hidden states and attention scores captured."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad):
        with DistillationCapture(model, scores=scores) as cap:
            return cap.run(batch)


# ----------------------------------------------------------------------------- stages
class _Stage(nn.Module):
    def bind(self, teacher: nn.Module) -> Callable:
        """``step_fn(model, batch) -> (loss, logs)`` with ``teacher`` fixed."""
        return functools.partial(_bound_step, self, teacher)

    def forward(self, student: nn.Module, teacher: nn.Module,
                batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def _bound_step(stage: _Stage, teacher: nn.Module, student: nn.Module, batch):
    return stage(student, teacher, batch)


class IntermediateKD(_Stage):
    """Stage 1: embedding + attention-score + FFN-output MSE, summed over mapped layers.

    ``layer_map=None`` uses :meth:`LayerMap.uniform` on the captured depths. When
    ``student_width != teacher_width`` learned projections (``nn.Linear``, no bias, one for the
    embeddings and one shared by the layers, as TinyBERT) are created: they are this module's
    parameters and must be given to the optimizer alongside the student's.
    ``prediction``: a :class:`PredictionKD` whose logit (+ hard-label) terms are added, computed
    from the same two forward passes (hidden states and predictions learned in one stage).
    """

    def __init__(self, layer_map: LayerMap | None = None, embedding_weight: float = 1.0,
                 attention_weight: float = 1.0, hidden_weight: float = 1.0,
                 student_width: int | None = None, teacher_width: int | None = None,
                 prediction: "PredictionKD | None" = None):
        super().__init__()
        self.layer_map = layer_map
        self.prediction = prediction
        self.embedding_weight = embedding_weight
        self.attention_weight = attention_weight
        self.hidden_weight = hidden_weight
        if student_width is not None and teacher_width is not None and student_width != teacher_width:
            self.embedding_projection = nn.Linear(student_width, teacher_width, bias=False)
            self.hidden_projection = nn.Linear(student_width, teacher_width, bias=False)
        else:
            self.embedding_projection = None
            self.hidden_projection = None

    def forward(self, student, teacher, batch):
        want_scores = self.attention_weight != 0
        t = capture_outputs(teacher, batch, no_grad=True, scores=want_scores)
        s = capture_outputs(student, batch, scores=want_scores)
        lmap = self.layer_map if self.layer_map is not None else LayerMap.uniform(
            len(s.hidden), len(t.hidden))
        lmap.check(len(s.hidden), len(t.hidden))
        mask = batch.get("attention_mask")
        zero = s.hidden[0].new_zeros((), dtype=torch.float32)
        emb = zero
        if self.embedding_weight:
            emb = hidden_mse_loss(s.embeddings, t.embeddings, mask, self.embedding_projection)
        att, hid = zero, zero
        for si, ti in lmap:
            if want_scores:
                att = att + attention_score_loss(s.scores[si], t.scores[ti], mask)
            if self.hidden_weight:
                hid = hid + hidden_mse_loss(s.hidden[si], t.hidden[ti], mask, self.hidden_projection)
        loss = self.embedding_weight * emb + self.attention_weight * att + self.hidden_weight * hid
        logs = {"kd_embedding": emb.item(), "kd_attention": att.item(), "kd_hidden": hid.item()}
        if self.prediction is not None:
            if s.logits is None or t.logits is None:
                raise ValueError("IntermediateKD: prediction terms need models that return logits")
            pred, pred_logs = self.prediction.terms(s.logits, t.logits, batch)
            loss = loss + pred
            logs.update(pred_logs)
        logs["loss"] = loss.item()
        return loss, logs


class PredictionKD(_Stage):
    """Stage 2: ``kd_weight * logit_kd_loss + label_weight * hard-label loss``.

    The hard-label loss is cross-entropy, or MSE when the logits have one column (regression);
    it needs ``labels`` in the batch when ``label_weight`` is non-zero.
    """

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0,
                 label_weight: float = 0.0, mode: str = "kl"):
        super().__init__()
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.label_weight = label_weight
        self.mode = mode

    def forward(self, student, teacher, batch):
        inputs = model_inputs(batch)
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        s_logits = student(**inputs).logits
        loss, logs = self.terms(s_logits, t_logits, batch)
        logs["loss"] = loss.item()
        return loss, logs

    def terms(self, s_logits: torch.Tensor, t_logits: torch.Tensor,
              batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted logit-KD (+ hard-label) loss of given logits, and its logs."""
        kd = logit_kd_loss(s_logits, t_logits, self.temperature, self.mode)
        loss = self.kd_weight * kd
        logs = {"kd_logits": kd.item()}
        if self.label_weight:
            labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
            if labels is None:
                raise KeyError("PredictionKD: label_weight > 0 but the batch has no labels")
            if s_logits.shape[-1] == 1:
                hard = F.mse_loss(s_logits.squeeze(-1).float(), labels.float())
            else:
                hard = F.cross_entropy(s_logits.float(), labels)
            loss = loss + self.label_weight * hard
            logs["hard_label"] = hard.item()
        return loss, logs
