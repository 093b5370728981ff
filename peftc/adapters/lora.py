"""LoRA: ``y = W x + b + scaling * B (A dropout(x))``, PEFT's semantics.

At a linear site the graph gains (dtype casts only when the base is fp16/bf16,
because the adapter trains in float32 as PEFT's does)::

    y = aten.linear(x, W, b)            y  = aten.linear(x, W, b)
                                 ==>    xd = aten.dropout(x, p, True)      # training only
                                        a  = aten.linear(xd, lora_A)
                                        d  = aten.linear(a, lora_B)
                                        s  = aten.where(gate, scaling, 0)   # per row
                                        d  = aten.mul(d, s)
                                        y2 = aten.add(y, d)
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import RuleError
from .base import Adapter, widen

aten = torch.ops.aten

_INITS = (True, False, "gaussian")


class LoRAState(nn.Module):
    """The low-rank pair at one site, with its scaling as a buffer."""

    def __init__(self, r: int, in_features: int, out_features: int, scaling: float, dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype))
        self.register_buffer("scaling", torch.tensor(scaling, dtype=dtype))

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


class LoRA(Adapter):
    """Low-rank adaptation of linear-like ops.

    Arguments:
        r: rank, > 0.
        alpha: scaling numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout probability on the adapter input, in training mode only.
        init: ``True`` (A Kaiming-uniform, B zeros), ``"gaussian"`` (A normal
            with std 1/r, B zeros) or ``False`` (both Kaiming-uniform: the
            adapter is not a no-op at the start).
        use_rslora: rank-stabilised scaling.
        rank_pattern, alpha_pattern: ``{pattern: value}`` overrides by module
            path, matched as PEFT does (``(.*\\.)?(pattern)$``, first hit wins).
    """

    kind = "lora"
    gates_itself = True  # the gate zeroes the scaling: a scalar, not an activation

    def __init__(self, r: int = 8, alpha: float = 8, dropout: float = 0.0, init=True,
                 use_rslora: bool = False, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.init, self.use_rslora = init, use_rslora
        self.rank_pattern = dict(rank_pattern or {})
        self.alpha_pattern = dict(alpha_pattern or {})
        for value in [r, *self.rank_pattern.values()]:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RuleError(f"LoRA rank r={value!r} must be a positive integer (try r=8)")
        for value in [alpha, *self.alpha_pattern.values()]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise RuleError(f"LoRA alpha={value!r} must be a finite number > 0 (try alpha=2*r)")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise RuleError(f"LoRA dropout={dropout!r} must be in [0, 1)")
        if init not in _INITS:
            raise RuleError(f"LoRA init={init!r} must be one of {_INITS}")

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        return _pattern_value(self.rank_pattern, path, self.r), _pattern_value(
            self.alpha_pattern, path, self.alpha
        )

    def scaling(self, path: str) -> float:
        r, alpha = self.rank_and_alpha(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def unsupported(self, site):
        if not site.is_linear:
            return f"LoRA supports linear-like ops (linear, addmm, mm, matmul), not {site.op}"
        return None

    def init_state(self, site) -> LoRAState:
        r, _ = self.rank_and_alpha(site.path)
        dtype = site.dtype if site.dtype == torch.float64 else torch.float32
        state = LoRAState(r, site.in_features, site.out_features, self.scaling(site.path), dtype)
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(state.lora_A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(state.lora_A, a=math.sqrt(5))
            if self.init is False:
                nn.init.kaiming_uniform_(state.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(state.lora_B)
        return state

    def emit(self, b, site):
        state_dtype = b.state.lora_A.dtype
        x = b.cast(b.x, state_dtype)
        if b.training and self.dropout > 0:
            x = b.call(aten.dropout.default, x, self.dropout, True)
        a = b.call(aten.linear.default, x, b.param("lora_A"))
        d = b.call(aten.linear.default, a, b.param("lora_B"))
        d = b.call(aten.mul.Tensor, d, b.gated(b.param("scaling"), b.y))
        return b.cast(b.call(aten.add.Tensor, b.y, d), site.dtype)

    def merge_delta(self, site, state, weights):
        delta = widen(state.scaling) * (widen(state.lora_B) @ widen(state.lora_A))
        return {site.weight_name: delta if site.layout == "out_in" else delta.T}

    def saved_state(self, site, state, prefix):
        return {f"{prefix}lora_A.weight": state.lora_A, f"{prefix}lora_B.weight": state.lora_B}

    def config(self):
        out = {"kind": self.kind, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
               "init": self.init, "use_rslora": self.use_rslora}
        if self.rank_pattern:
            out["rank_pattern"] = self.rank_pattern
        if self.alpha_pattern:
            out["alpha_pattern"] = self.alpha_pattern
        return out

    def __repr__(self):
        return f"LoRA(r={self.r}, alpha={self.alpha}, dropout={self.dropout})"


def _pattern_value(patterns: dict, path: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
