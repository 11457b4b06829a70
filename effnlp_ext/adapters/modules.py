"""Adaptable adapters (Moosavi et al., 2022): rational activations, bottleneck adapters and
per-layer switches.

* ``RationalActivation``: a learnable ``P(x) / (1 + |S(x)|)`` (the ``rational`` op), initialised
  to a least-squares fit of a familiar function (``fits.py``).
* ``Adapter``: ``h + up(act(down(h)))``, the bottleneck adapter; ``up`` starts at zero, so a
  fresh adapter is the identity map.
* ``LayerSwitch``: a learnable two-way choice, "adapter" or "identity", sampled with the
  straight-through Gumbel-softmax in training and taken by argmax in eval.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._ops import rational
from .fits import APPROXIMATIONS, rational_init

CHOICES = ("adapter", "identity")


class RationalActivation(nn.Module):
    """Learnable rational activation ``P(x) / (1 + |S(x)|)`` with degrees ``(m, n)``.

    Args:
        approx: the function the coefficients start from (``"gelu"``, ``"relu"``,
            ``"leaky_relu"``, ``"tanh"``, ``"identity"`` or ``"one"``; fitted on [-3, 3]).
        degrees: ``(m, n)``, the degrees of ``P`` and ``S``.
        groups: channel groups of the last dim, each with its own coefficients (all start from
            the same fit).
    Coefficients are float32 parameters ``numerator [G, m+1]`` and ``denominator [G, n]``,
    ascending order; the forward casts them to the input's dtype.
    """

    def __init__(self, approx: str = "gelu", degrees: tuple[int, int] = (5, 4), groups: int = 1):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be positive, got {groups}")
        self.approx, self.degrees, self.groups = approx, tuple(degrees), int(groups)
        a, b = rational_init(approx, self.degrees)
        self.numerator = nn.Parameter(a.float().repeat(groups, 1))
        self.denominator = nn.Parameter(b.float().repeat(groups, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator.to(x.dtype), self.denominator.to(x.dtype))

    def extra_repr(self) -> str:
        return f"approx={self.approx!r}, degrees={self.degrees}, groups={self.groups}"


def make_activation(activation: str | nn.Module, degrees: tuple[int, int] = (5, 4)) -> nn.Module:
    """``"relu"``, ``"gelu"``, ``"tanh"``, ``"identity"``; ``"rational"`` (a rational
    activation initialised to ReLU) or ``"rational:<approx>"``; or a module, used as is."""
    if isinstance(activation, nn.Module):
        return activation
    fixed = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}
    if activation in fixed:
        return fixed[activation]()
    if activation == "rational" or activation.startswith("rational:"):
        approx = activation.partition(":")[2] or "relu"
        if approx not in APPROXIMATIONS:
            raise ValueError(f"unknown rational start {approx!r}; choose one of {sorted(APPROXIMATIONS)}")
        return RationalActivation(approx, degrees)
    raise ValueError(f"unknown activation {activation!r}: use relu, gelu, tanh, identity, "
                     f"rational[:<approx>] or an nn.Module")


class Adapter(nn.Module):
    """Bottleneck adapter ``h + up(act(down(h)))`` with ``hidden // reduction_factor`` units.

    ``down`` is initialised N(0, init_std) and ``up`` to zero, so a new adapter is exactly the
    identity and training starts from the frozen model's function.
    """

    def __init__(self, hidden: int, reduction_factor: int = 16, activation: str | nn.Module = "relu",
                 init_std: float = 0.02):
        super().__init__()
        if reduction_factor < 1 or hidden < 1:
            raise ValueError("hidden and reduction_factor must be positive")
        self.hidden, self.bottleneck = hidden, max(1, hidden // reduction_factor)
        self.down = nn.Linear(hidden, self.bottleneck)
        self.act = make_activation(activation)
        self.up = nn.Linear(self.bottleneck, hidden)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class LayerSwitch(nn.Module):
    """Learnable choice between ``CHOICES`` = ("adapter", "identity") for one layer.

    ``weights()`` is a one-hot vector over the choices: in training, a hard Gumbel-softmax
    sample at ``self.temperature`` whose gradient is that of the soft sample (straight
    through); in eval, the argmax of the logits. ``forward(h, adapter)`` mixes
    ``adapter(h)`` and ``h`` with those weights (in eval, only the chosen branch runs).
    The logits start at ``init_logits`` (equal by default: both choices equally likely).
    """

    def __init__(self, temperature: float = 1.0, init_logits: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(init_logits, dtype=torch.float32))
        self.temperature = float(temperature)

    def weights(self) -> torch.Tensor:
        if self.training:
            return F.gumbel_softmax(self.logits, tau=self.temperature, hard=True)
        return F.one_hot(self.logits.argmax(), len(CHOICES)).to(self.logits.dtype)

    def choice(self) -> str:
        """The current deterministic choice (argmax of the logits)."""
        return CHOICES[int(self.logits.detach().argmax())]

    def probabilities(self) -> torch.Tensor:
        return self.logits.detach().softmax(-1)

    def forward(self, h: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
        if not self.training:
            return adapter(h) if self.choice() == "adapter" else h
        w = self.weights().to(h.dtype)
        return w[0] * adapter(h) + w[1] * h

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"


def temperature_schedule(step: int, total_steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """Exponential annealing of the Gumbel-softmax temperature: ``start`` at step 0, ``end`` at
    ``total_steps`` (and after)."""
    if total_steps <= 0:
        return end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return start * math.exp(frac * math.log(end / start))


def expected_adapter_fraction(model: nn.Module) -> torch.Tensor:
    """Mean over the model's ``LayerSwitch``es of P(adapter) = softmax(logits)[0]: the expected
    fraction of layers that keep their adapter (differentiable in the logits; 0 without
    switches). Added to the loss with a weight, it is the price of an adapter: a layer keeps
    its adapter only where the task loss gains more than that price."""
    probs = [m.logits.softmax(-1)[0] for m in model.modules() if isinstance(m, LayerSwitch)]
    if not probs:
        return torch.zeros(())
    return torch.stack(probs).mean()


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Sets the temperature of every ``LayerSwitch`` in ``model``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, LayerSwitch):
            m.temperature = float(temperature)
            count += 1
    return count
