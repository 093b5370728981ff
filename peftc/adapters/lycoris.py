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
Conv1D) work too; PEFT adapts only ``nn.Linear`` and convolutions with these kinds, so
such an adapter saves in peftc's own format.

At a convolution (Conv1d, Conv2d: PEFT has no Conv3d for these kinds) the delta has the
weight's shape ``[out, in / groups, *kernel]`` (the factors make ``[out, in / groups *
prod(kernel)]``, reshaped, or with ``use_effective_conv2d`` a kernel-shaped core), and the
graph adds the convolution of the input by it, with the base's stride, padding, dilation
and groups::

    y = aten.conv2d(x, W, b, s, p, d, g)   ==>   y2 = aten.add(y, aten.conv2d(xg, D, None, s, p, d, g))
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import RuleError
from ..sites import CONVOLUTION
from .base import Adapter, check_rank_alpha, conv_refusal, pattern_value, widen

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

    def kron(self, x, y):  # kron views its second operand: give it plain strides (see TensorOps.kron)
        y = self.b.call(aten.clone.default, y, memory_format=torch.contiguous_format)
        return self.b.call(aten.kron.default, x, y)

    def einsum(self, equation: str, *xs):
        return self.b.call(aten.einsum.default, equation, list(xs))

    def reshape(self, x, shape):
        return self.b.call(aten.reshape.default, x, list(shape))


class TensorOps:
    """The same vocabulary on a state's tensors, widened (for merging)."""

    def __init__(self, state: nn.Module):
        self.state = state

    def get(self, name: str) -> torch.Tensor:
        return widen(getattr(self.state, name).detach())

    mm, mul = staticmethod(torch.mm), staticmethod(torch.mul)
    einsum, reshape = staticmethod(torch.einsum), staticmethod(torch.reshape)

    @staticmethod
    def kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # PEFT's .contiguous() keeps an einsum's odd stride on a size-1 dim, which kron can't
        # view (PEFT fails on LoKr's Conv1d cores of rank 1); a clone gives plain strides
        return torch.kron(x, y.clone(memory_format=torch.contiguous_format))


class Lycoris(Adapter):
    """Base of LoHa and LoKr: PEFT's ``r``, ``alpha``, ``rank_dropout``, ``module_dropout``,
    ``rank_pattern`` and ``alpha_pattern`` (see :class:`~peftc.LoHa`)."""

    label: ClassVar[str] = ""
    #: whether rank dropout divides its mask by the mask's mean (always for LoHa)
    rank_dropout_scale: bool = True

    def __init__(self, r: int, alpha: float, rank_dropout: float, module_dropout: float, init,
                 rank_pattern: dict | None, alpha_pattern: dict | None, inits: tuple,
                 use_effective_conv2d: bool = False):
        self.r, self.alpha, self.init = r, alpha, init
        if not isinstance(use_effective_conv2d, bool):
            raise RuleError(f"{self.label} use_effective_conv2d={use_effective_conv2d!r} must be True or False")
        self.use_effective_conv2d = use_effective_conv2d
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
        if site.kind == CONVOLUTION:
            if site.conv.dims == 3:
                return (f"PEFT 0.21's {self.label} adapts Conv1d and Conv2d, not Conv3d; "
                        f"leave {site.path} out of the targets or use LoRA there")
            return conv_refusal(site, self.label)
        if not site.is_linear:
            return f"{self.label} adapts linear-like ops (linear, addmm, mm, matmul) and convolutions, not {site.op}"
        return None

    def effective_conv(self, site) -> bool:
        """Whether the factors hold a kernel-shaped core at this site (``use_effective_conv2d`` on a
        convolution whose kernel isn't pointwise, as PEFT decides)."""
        return self.use_effective_conv2d and site.conv is not None and any(k != 1 for k in site.conv.kernel)

    # -- what a kind defines ------------------------------------------------------

    def factors(self, r: int, site) -> dict[str, tuple[int, ...]]:
        """``{PEFT's parameter name: shape}`` at a site of this rank; a convolution's are read as
        an ``[out, in / groups * prod(kernel)]`` matrix, or with :meth:`effective_conv` a core
        ``[r, r, k1, k2]`` (``[r, r, k, 1]`` for Conv1d) between ``[r, out]`` and ``[r, in / groups]``."""
        raise NotImplementedError

    def initialise(self, state: Factors) -> None:
        """Fill the factors as PEFT does for ``self.init``."""
        raise NotImplementedError

    def delta(self, ops, state: Factors):
        """The delta, scaling included, in ``ops``' vocabulary: ``[out, in]`` at a linear site;
        at a convolution any shape with the weight's elements in its order (reshaped by the caller)."""
        raise NotImplementedError

    def _delta(self, ops, state: Factors, site):
        """:meth:`delta` in the site weight's shape (``[out, in]`` for linear ops)."""
        delta = self.delta(ops, state)
        if site.conv is None:
            return delta
        return ops.reshape(delta, (site.out_features, site.in_features // site.conv.groups, *site.conv.kernel))

    # -- the protocol -------------------------------------------------------------

    def init_state(self, site) -> Factors:
        r, alpha = self.rank_and_alpha(site)
        dtype = site.dtype if site.dtype == torch.float64 else torch.float32
        state = Factors(self.factors(r, site), alpha / r, dtype, site.device)
        with torch.no_grad():
            self.initialise(state)
        return state

    def emit(self, b, site):
        state_dtype = b.state.scaling.dtype
        keep = None
        if b.training and self.module_dropout > 0:  # drawn first, as PEFT draws it
            draw = b.call(aten.rand.default, [1], dtype=state_dtype, device=site.device)
            keep = b.call(aten.gt.Scalar, draw, self.module_dropout)
        delta = self._delta(GraphOps(b), b.state, site)
        if b.training and self.rank_dropout > 0:
            draw = b.call(aten.rand.default, [site.out_features], dtype=state_dtype, device=site.device)
            mask = b.call(aten.to.dtype, b.call(aten.gt.Scalar, draw, self.rank_dropout), state_dtype)
            if self.rank_dropout_scale:
                mask = b.call(aten.div.Tensor, mask, b.call(aten.mean.default, mask))
            rows = [-1] + [1] * (1 if site.conv is None else site.conv.dims + 1)
            delta = b.call(aten.mul.Tensor, delta, b.call(aten.view.default, mask, rows))
        x = b.cast(b.x, state_dtype)
        if b.training:  # an inactive adapter's rows pass no gradient, even 0 @ NaN
            x = b.call(aten.where.ScalarOther, b.row_mask(b.x), x, 0)
        if site.conv is None:
            out = b.call(aten.linear.default, x, delta)
        else:
            conv = site.conv
            padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
            out = b.call(conv.op(padding), x, delta, None, list(conv.stride), padding, list(conv.dilation), conv.groups)
        y = b.call(aten.add.Tensor, b.y, out)
        if keep is not None:
            y = b.call(aten.where.self, keep, y, b.y)
        return b.cast(y, site.dtype)

    def merge_delta(self, site, state, weights):
        delta = self._delta(TensorOps(state), state, site)
        return {site.weight_name: delta if site.layout == "out_in" else delta.T}

    def config(self):
        out = {"kind": self.kind, "r": self.r, "alpha": self.alpha, "rank_dropout": self.rank_dropout,
               "module_dropout": self.module_dropout, "init": self.init,
               "use_effective_conv2d": self.use_effective_conv2d}
        if self.rank_pattern:
            out["rank_pattern"] = self.rank_pattern
        if self.alpha_pattern:
            out["alpha_pattern"] = self.alpha_pattern
        return out

    def peft_fields(self) -> dict:
        """This spec's options under PEFT's names (``r``, ``alpha``, patterns: per site, by the caller)."""
        return {"rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                "init_weights": self.init, "use_effective_conv2d": self.use_effective_conv2d}

    def __repr__(self):
        return f"{type(self).__name__}(r={self.r}, alpha={self.alpha})"


def peft_options(config: dict) -> dict:
    """The keyword arguments shared by LoHa and LoKr from a PEFT config dict."""
    return {"r": config.get("r", 8), "alpha": config.get("alpha", 8),
            "rank_dropout": config.get("rank_dropout", 0.0), "module_dropout": config.get("module_dropout", 0.0),
            "init": config.get("init_weights", True), "rank_pattern": config.get("rank_pattern"),
            "alpha_pattern": config.get("alpha_pattern"),
            "use_effective_conv2d": config.get("use_effective_conv2d", False)}
