"""Named activations: elementwise torch functions with their kinks and closed-form β (Joudaki et al. 2023, Table 2).

An :class:`Activation` is a plain elementwise function ``σ`` plus what exact quadrature needs to
know about it: its *kinks*, the points where ``σ`` is not smooth (a jump, a corner, a jump of a
higher derivative), so that integrals can be split there; and, where one is known, the isometry
strength ``β_σ(α)`` of ``x ↦ σ(α x)`` in closed form (Joudaki et al. 2023, Definition 3):

* from the paper, Table 2 and Table C.1: He₁ ``1``; He₂ ``2``; sin ``2 − 2e/(e² − 1)``, with gain
  ``2(e^{2α²} − e^{α²}α² − 1)/(e^{2α²} − 1) = 2 − α²/sinh(α²)``; exp(x − 2) ``2 − 1/(e − 1)``,
  with gain ``(2 − 2e^{α²} + α²)/(1 − e^{α²}) = 2 − α²/(e^{α²} − 1)`` (the registry's ``exp``
  is ``exp(αx − 2) = e⁻² exp(αx)``: the constant factor cancels in β, so Table C.1 applies);
  step ``2 − 2/π``; ReLU ``(3π − 4)/(2π − 2)`` for every gain;
* derived here (each checked against independent quadrature in the tests): identity ``1``;
  abs and cos ``2`` (even: ``c₁ = 0``); leaky ReLU ``σ = a x + b|x|``, ``a = (1+s)/2``,
  ``b = (1−s)/2``: ``2 − a²/(a² + b²(1 − 2/π))``; hardtanh with ``t = 1/|α|``:
  ``c₁ = α erf(t/√2)``, ``Var = α²(erf(t/√2) − 2tφ(t)) + erfc(t/√2)``.

Every closed form is for a gain ``α ≠ 0``: at ``α = 0`` the activation is constant and β is
undefined. Anywhere isoprobe takes an activation, a registry name, an :class:`Activation` or any
elementwise torch callable works (:func:`get_activation`); a bare callable has unknown kinks
and is integrated adaptively.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "ActivationLike",
    "get_activation",
    "list_activations",
    "registry_report",
]

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default negative slope


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``σ`` and what exact quadrature needs to know about it.

    ``fn`` maps a float64 tensor to a float64 tensor of the same shape. ``kinks`` lists the
    points of non-smoothness of ``σ`` (at gain 1); ``kinks_known=False`` says the list is not
    known (a bare callable), so quadrature must find them adaptively. ``closed_form_beta(α)``
    is β of ``x ↦ σ(α x)`` where a closed form exists. ``formula`` is for display.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    kinks: tuple[float, ...] = ()
    closed_form_beta: Callable[[float], float] | None = field(default=None, compare=False)
    formula: str = field(default="", compare=False)
    kinks_known: bool = True
    shifted: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    def __call__(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """``σ(gain · x)``."""
        return self.fn(x if gain == 1.0 else gain * x)

    def from_origin(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """``σ(gain · x) − σ(0)`` without cancellation at small ``|x|``.

        Where ``σ(0) ≠ 0`` and ``σ`` is smooth at 0, ``σ(x) − σ(0)`` computed as a difference
        keeps only ``ε |σ(0)|`` of absolute accuracy (for the logistic, ``1e-16`` — all of it
        once ``|x| ≈ 1e-15``); ``shifted`` is then a closed form without the subtraction
        (logistic: ``tanh(x/2)/2``). Without one, the difference itself (exact when ``σ(0) = 0``).
        """
        x = x if gain == 1.0 else gain * x
        if self.shifted is not None:
            return self.shifted(x)
        origin = float(self.fn(torch.zeros((), dtype=torch.float64)))
        return self.fn(x) if origin == 0.0 else self.fn(x) - origin


ActivationLike = str | Activation | Callable[[torch.Tensor], torch.Tensor]


def _constant(value: float) -> Callable[[float], float]:
    def beta(gain: float) -> float:
        return value

    return beta


def _beta_sin(gain: float) -> float:
    a2 = gain * gain
    return 2.0 - a2 / math.sinh(a2) if a2 < 700 else 2.0


def _beta_exp(gain: float) -> float:
    a2 = gain * gain
    return 2.0 - a2 / math.expm1(a2) if a2 < 700 else 2.0


def _beta_leaky(gain: float) -> float:
    a, b = (1 + LEAKY_SLOPE) / 2, (1 - LEAKY_SLOPE) / 2
    return 2.0 - a * a / (a * a + b * b * (1 - 2 / math.pi))


def _beta_hardtanh(gain: float) -> float:
    t = 1.0 / abs(gain)
    inside = math.erf(t / math.sqrt(2))
    pdf = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    c1_sq = gain * gain * inside * inside
    var = gain * gain * (inside - 2 * t * pdf) + math.erfc(t / math.sqrt(2))
    return 2.0 - c1_sq / var


def _step(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).to(x.dtype)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + eˣ) exactly: torch's softplus switches to x above a threshold (a 2e-9 jump at 20)
    return torch.logaddexp(x, torch.zeros_like(x))


def _softplus_shifted(x: torch.Tensor) -> torch.Tensor:
    # log(1 + eˣ) − log 2 = log1p(expm1(x)/2): no cancellation near 0; the plain difference above 1
    small = torch.log1p(torch.expm1(x.clamp(max=1.0)) / 2)
    return torch.where(x < 1.0, small, _softplus(x) - math.log(2.0))


def _entry(
    name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    formula: str,
    kinks: tuple[float, ...] = (),
    beta: Callable[[float], float] | None = None,
    shifted: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[str, Activation]:
    return name, Activation(name, fn, kinks, beta, formula, shifted=shifted)


ACTIVATIONS: dict[str, Activation] = dict(
    [
        _entry("identity", lambda x: x, "x", beta=_constant(1.0)),
        _entry("he1", lambda x: x, "He₁(x) = x", beta=_constant(1.0)),
        _entry("he2", lambda x: x * x - 1, "He₂(x) = x² − 1", beta=_constant(2.0), shifted=lambda x: x * x),
        _entry("relu", torch.relu, "max(x, 0)", (0.0,), _constant((3 * math.pi - 4) / (2 * math.pi - 2))),
        _entry(
            "leaky_relu",
            lambda x: F.leaky_relu(x, LEAKY_SLOPE),
            f"max(x, {LEAKY_SLOPE} x)",
            (0.0,),
            _beta_leaky,
        ),
        _entry("elu", F.elu, "x if x > 0 else eˣ − 1", (0.0,)),
        _entry("selu", F.selu, "λ (x if x > 0 else a(eˣ − 1)), λ≈1.0507, a≈1.6733", (0.0,)),
        _entry("gelu", F.gelu, "x Φ(x) (erf form)"),
        _entry("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), "x (1 + tanh(√(2/π)(x + 0.044715 x³)))/2"),
        _entry("silu", F.silu, "x sigmoid(x)"),
        _entry("mish", lambda x: x * torch.tanh(_softplus(x)), "x tanh(log(1 + eˣ))"),
        _entry("softplus", _softplus, "log(1 + eˣ)", shifted=_softplus_shifted),
        _entry("tanh", torch.tanh, "tanh(x)"),
        _entry("sigmoid", torch.sigmoid, "1/(1 + e⁻ˣ)", shifted=lambda x: torch.tanh(x / 2) / 2),
        _entry("hardtanh", lambda x: x.clamp(-1.0, 1.0), "clip(x, −1, 1)", (-1.0, 1.0), _beta_hardtanh),
        _entry("step", _step, "1[x > 0]", (0.0,), _constant(2 - 2 / math.pi)),
        _entry("abs", torch.abs, "|x|", (0.0,), _constant(2.0)),
        _entry("sin", torch.sin, "sin(x)", beta=_beta_sin),
        _entry("cos", torch.cos, "cos(x)", beta=_constant(2.0), shifted=lambda x: -2 * torch.sin(x / 2) ** 2),
        _entry(
            "exp",
            lambda x: torch.exp(x - 2),
            "exp(x − 2)",
            beta=_beta_exp,
            shifted=lambda x: math.exp(-2) * torch.expm1(x),
        ),
    ]
)


def list_activations() -> list[str]:
    """Names of the registered activations, in registry order."""
    return list(ACTIVATIONS)


def get_activation(act: ActivationLike) -> Activation:
    """Resolve a registry name, an :class:`Activation` or an elementwise torch callable.

    A callable becomes an :class:`Activation` with unknown kinks (``kinks_known=False``).
    An unknown name raises ``ValueError`` listing the valid names.
    """
    if isinstance(act, Activation):
        return act
    if isinstance(act, str):
        key = act.strip().lower().replace("-", "_")
        if key not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {act!r}; valid names: {', '.join(ACTIVATIONS)} "
                "(or pass any elementwise torch callable)"
            )
        return ACTIVATIONS[key]
    if callable(act):
        name = getattr(act, "__name__", None) or type(act).__name__
        return Activation(name=name, fn=act, kinks=(), kinks_known=False)
    raise TypeError(
        f"an activation must be a registry name, an Activation or a torch callable, got {type(act).__name__}"
    )


def registry_report(as_json: bool = False) -> str:
    """The registry as a text table (name, formula, kinks, closed-form β yes/no) or JSON."""
    rows = [
        {
            "name": a.name,
            "formula": a.formula,
            "kinks": list(a.kinks),
            "closed_form_beta": a.closed_form_beta is not None,
        }
        for a in ACTIVATIONS.values()
    ]
    if as_json:
        return json.dumps(rows, indent=2, ensure_ascii=False)
    header = ("name", "formula", "kinks", "closed-form β")
    body = [
        (
            r["name"],
            r["formula"],
            ", ".join(f"{k:g}" for k in r["kinks"]) or "-",
            "yes" if r["closed_form_beta"] else "no",
        )
        for r in rows
    ]
    return _format_table(header, body)


def _format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned plain-text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
