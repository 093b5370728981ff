"""What LoHa and LoKr share (PEFT's LyCORIS kinds): a weight delta built from small factors.

A kind says which factors a site gets (:meth:`Lycoris.factors`) and how they make the
``[out, in]`` delta (:meth:`Lycoris.delta`, written once against :class:`GraphOps` or
:class:`TensorOps`, so the graph and the merge compute the same thing). The graph adds
``linear(x, delta)`` to the op's output, as PEFT does; in training, PEFT's rank dropout
masks rows of the delta and module dropout skips the adapter for the whole batch::

    y = aten.linear(x, W, b)      keep = aten.gt(aten.rand([1]), module_dropout)       # training, if > 0
                           ==>    D    = <the kind's delta>(factors) * scaling          # [out, in]
                                  m    = aten.to(aten.gt(aten.rand([out]), rank_dropout), float32)
                                  D    = D * view(m / mean(m), [-1, 1])                 # training, if > 0
                                  xg   = aten.where(row_mask, x, 0)                     # training only
                                  y2   = aten.add(y, aten.linear(xg, D))
                                  y2   = aten.where(keep, y2, y)                        # training, if > 0
                                  y3   = aten.where(gate, y2, y)                        # per row (peftc adds it)

The delta is ``[out, in]`` whatever the weight's layout, so ``x @ W`` sites (GPT-2's
Conv1D) work too; PEFT adapts only ``nn.Linear`` (and convolutions, which peftc
refuses) with these kinds, so such an adapter saves in peftc's own format.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import RuleError
from .base import Adapter, check_rank_alpha, pattern_value, widen

aten = torch.ops.aten


class Factors(nn.Module):
    """One site's factors, by PEFT's names, and its scaling (``alpha / r``) as a buffer."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], scaling: float, dtype, device):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        self.register_buffer("scaling", torch.tensor(scaling, dtype=dtype, device=device))


class GraphOps:
    """The delta's vocabulary as graph nodes (for ``emit``)."""

    def __init__(self, b):
        self.b = b

    def get(self, name: str):
        return self.b.param(name)

    def mm(self, x, y):
        return self.b.call(aten.mm.default, x, y)

    def mul(self, x, y):
        return self.b.call(aten.mul.Tensor, x, y)

    def kron(self, x, y):
        return self.b.call(aten.kron.default, x, y)


class TensorOps:
    """The same vocabulary on a state's tensors, widened (for merging)."""

    def __init__(self, state: nn.Module):
        self.state = state

    def get(self, name: str) -> torch.Tensor:
        return widen(getattr(self.state, name).detach())

    mm, mul, kron = staticmethod(torch.mm), staticmethod(torch.mul), staticmethod(torch.kron)


class Lycoris(Adapter):
    """Base of LoHa and LoKr: PEFT's ``r``, ``alpha``, ``rank_dropout``, ``module_dropout``,
    ``rank_pattern`` and ``alpha_pattern`` (see :class:`~peftc.LoHa`)."""

    label: ClassVar[str] = ""
    #: whether rank dropout divides its mask by the mask's mean (always for LoHa)
    rank_dropout_scale: bool = True

    def __init__(self, r: int, alpha: float, rank_dropout: float, module_dropout: float, init,
                 rank_pattern: dict | None, alpha_pattern: dict | None, inits: tuple):
        self.r, self.alpha, self.init = r, alpha, init
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_pattern, self.alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        check_rank_alpha(self.label, r, alpha, self.rank_pattern, self.alpha_pattern)
        for what, p in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise RuleError(f"{self.label} {what}={p!r} must be in [0, 1)")
        if init not in inits:
            raise RuleError(f"{self.label} init={init!r} must be one of {inits}")

    def rank_and_alpha(self, site) -> tuple[int, float]:
        return pattern_value(self.rank_pattern, site, self.r), pattern_value(self.alpha_pattern, site, self.alpha)

    def unsupported(self, site):
        if not site.is_linear:
            return f"{self.label} adapts linear-like ops (linear, addmm, mm, matmul), not {site.op}"
        return None

    # -- what a kind defines ------------------------------------------------------

    def factors(self, r: int, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """``{PEFT's parameter name: shape}`` at a site of this rank and size."""
        raise NotImplementedError

    def initialise(self, state: Factors) -> None:
        """Fill the factors as PEFT does for ``self.init``."""
        raise NotImplementedError

    def delta(self, ops, state: Factors):
        """The ``[out, in]`` delta, scaling included, in ``ops``' vocabulary."""
        raise NotImplementedError

    # -- the protocol -------------------------------------------------------------

    def init_state(self, site) -> Factors:
        r, alpha = self.rank_and_alpha(site)
        dtype = site.dtype if site.dtype == torch.float64 else torch.float32
        state = Factors(self.factors(r, site.out_features, site.in_features), alpha / r, dtype, site.device)
        with torch.no_grad():
            self.initialise(state)
        return state

    def emit(self, b, site):
        state_dtype = b.state.scaling.dtype
        keep = None
        if b.training and self.module_dropout > 0:  # drawn first, as PEFT draws it
            draw = b.call(aten.rand.default, [1], dtype=state_dtype, device=site.device)
            keep = b.call(aten.gt.Scalar, draw, self.module_dropout)
        delta = self.delta(GraphOps(b), b.state)
        if b.training and self.rank_dropout > 0:
            draw = b.call(aten.rand.default, [site.out_features], dtype=state_dtype, device=site.device)
            mask = b.call(aten.to.dtype, b.call(aten.gt.Scalar, draw, self.rank_dropout), state_dtype)
            if self.rank_dropout_scale:
                mask = b.call(aten.div.Tensor, mask, b.call(aten.mean.default, mask))
            delta = b.call(aten.mul.Tensor, delta, b.call(aten.view.default, mask, [-1, 1]))
        x = b.cast(b.x, state_dtype)
        if b.training:  # an inactive adapter's rows pass no gradient, even 0 @ NaN
            x = b.call(aten.where.ScalarOther, b.row_mask(b.x), x, 0)
        y = b.call(aten.add.Tensor, b.y, b.call(aten.linear.default, x, delta))
        if keep is not None:
            y = b.call(aten.where.self, keep, y, b.y)
        return b.cast(y, site.dtype)

    def merge_delta(self, site, state, weights):
        delta = self.delta(TensorOps(state), state)
        return {site.weight_name: delta if site.layout == "out_in" else delta.T}

    def config(self):
        out = {"kind": self.kind, "r": self.r, "alpha": self.alpha, "rank_dropout": self.rank_dropout,
               "module_dropout": self.module_dropout, "init": self.init}
        if self.rank_pattern:
            out["rank_pattern"] = self.rank_pattern
        if self.alpha_pattern:
            out["alpha_pattern"] = self.alpha_pattern
        return out

    def peft_fields(self) -> dict:
        """This spec's options under PEFT's names (``r``, ``alpha``, patterns: per site, by the caller)."""
        return {"rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                "init_weights": self.init, "use_effective_conv2d": False}

    def __repr__(self):
        return f"{type(self).__name__}(r={self.r}, alpha={self.alpha})"


def peft_options(config: dict) -> dict:
    """The keyword arguments shared by LoHa and LoKr from a PEFT config dict."""
    return {"r": config.get("r", 8), "alpha": config.get("alpha", 8),
            "rank_dropout": config.get("rank_dropout", 0.0), "module_dropout": config.get("module_dropout", 0.0),
            "init": config.get("init_weights", True), "rank_pattern": config.get("rank_pattern"),
            "alpha_pattern": config.get("alpha_pattern")}
