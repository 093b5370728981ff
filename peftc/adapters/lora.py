"""LoRA: ``y = W x + b + scaling * B (A dropout(x))``, PEFT's semantics.

At a linear site the graph gains (dtype casts only when the base is fp16/bf16,
because the adapter trains in float32 as PEFT's does)::

    y = aten.linear(x, W, b)            y  = aten.linear(x, W, b)
                                 ==>    xg = aten.where(gate, x, 0)        # training only, per row
                                        xd = aten.dropout(xg, p, True)     # training only
                                        a  = aten.linear(xd, lora_A)
                                        d  = aten.linear(a, lora_B)
                                        d  = aten.mul(d, scaling)
                                        y2 = aten.add(y, d)
                                        y3 = aten.where(gate, y2, y)        # per row (peftc adds it)

At an embedding lookup (PEFT's ``lora_embedding_A [r, rows]`` and ``lora_embedding_B [width, r]``;
no dropout, as in PEFT)::

    y = aten.embedding(W, ids, pad)     y  = aten.embedding(W, ids, pad)
                                 ==>    a  = aten.embedding(t(lora_embedding_A), ids, pad)
                                        a  = aten.where(gate, a, 0)         # training only, per row
                                        d  = aten.matmul(a, t(lora_embedding_B))
                                        y2 = aten.add(y, aten.mul(d, scaling))

A model that scales its embeddings after the lookup (Gemma's ``embed_scale``) scales the
adapter's term with them, as PEFT does.

The gate *selects* the adapted output or the original one; it never multiplies.
Gating by a zero scaling (``d * where(gate, scaling, 0)``) would let NaN or inf
in an inactive adapter's A or B reach the output (``NaN * 0 = NaN``); ``where``
takes exactly one side, so an inactive or disabled adapter's values never do.
Training graphs select the adapter's input the same way, so that the backward
pass gives an inactive adapter's rows no gradient either: without it, ``0 @ NaN``
would carry a NaN in its A or B into every gradient upstream.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import RuleError
from ..match import compile_regex
from .base import Adapter, widen

aten = torch.ops.aten
EMBEDDING = "embedding"  # the site kind of an aten.embedding lookup

_INITS = (True, False, "gaussian")
_COMBINATIONS = ("linear", "cat", "svd")


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


class LoRAEmbeddingState(nn.Module):
    """The low-rank pair at one embedding lookup, with PEFT's names and layouts."""

    def __init__(self, r: int, rows: int, width: int, scaling: float, dtype):
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.empty(r, rows, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(width, r, dtype=dtype))
        self.register_buffer("scaling", torch.tensor(scaling, dtype=dtype))

    @property
    def r(self) -> int:
        return self.lora_embedding_A.shape[0]


class LoRA(Adapter):
    """Low-rank adaptation of linear-like ops and embedding lookups.

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
    # peftc selects the output with the gate (``where(gate, y2, y)``): never gate by
    # multiplying, or NaN/inf in an inactive adapter reaches the output as NaN * 0
    gates_itself = False

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
        for what, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in patterns:
                compile_regex(key, f"{what} key", _PATTERN)

    def rank_and_alpha(self, site) -> tuple[int, float]:
        """The site's rank and alpha: a pattern matching its module path, or the key it is saved
        under (a bare parameter's weight path), else the defaults."""
        paths = (site.path, site.key)
        return _pattern_value(self.rank_pattern, paths, self.r), _pattern_value(
            self.alpha_pattern, paths, self.alpha
        )

    def scaling(self, site) -> float:
        r, alpha = self.rank_and_alpha(site)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def unsupported(self, site):
        if not site.is_linear and site.kind != EMBEDDING:
            return f"LoRA supports linear-like ops (linear, addmm, mm, matmul) and embedding lookups, not {site.op}"
        return None

    def init_state(self, site) -> LoRAState | LoRAEmbeddingState:
        r, _ = self.rank_and_alpha(site)
        dtype = site.dtype if site.dtype == torch.float64 else torch.float32
        if site.kind == EMBEDDING:  # PEFT: A zeros and B normal, or (init=False) both normal
            state = LoRAEmbeddingState(r, site.in_features, site.out_features, self.scaling(site), dtype)
            with torch.no_grad():
                nn.init.normal_(state.lora_embedding_B)
                if self.init is False:
                    nn.init.normal_(state.lora_embedding_A)
                else:
                    nn.init.zeros_(state.lora_embedding_A)
            return state
        state = LoRAState(r, site.in_features, site.out_features, self.scaling(site), dtype)
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
        if site.kind == EMBEDDING:
            return self._emit_embedding(b, site)
        state_dtype = b.state.lora_A.dtype
        x = b.cast(b.x, state_dtype)
        if b.training:  # backward too: an inactive adapter's rows pass no gradient, even 0 @ NaN
            x = b.call(aten.where.ScalarOther, b.row_mask(b.x), x, 0)
        if b.training and self.dropout > 0:
            x = b.call(aten.dropout.default, x, self.dropout, True)
        a = b.call(aten.linear.default, x, b.param("lora_A"))
        d = b.call(aten.linear.default, a, b.param("lora_B"))
        d = b.call(aten.mul.Tensor, d, b.param("scaling"))
        return b.cast(b.call(aten.add.Tensor, b.y, d), site.dtype)

    def _emit_embedding(self, b, site):
        """``y + scaling * (A^T[ids] @ B^T)``, the lookup with the base op's padding index."""
        ids, padding = b.arg(1, "indices"), b.arg(2, "padding_idx")
        table = b.call(aten.t.default, b.param("lora_embedding_A"))
        a = b.call(aten.embedding.default, table, ids, -1 if padding is None else padding)
        if b.training:  # an inactive adapter's rows pass no gradient, even 0 @ NaN
            a = b.call(aten.where.ScalarOther, b.row_mask(b.y), a, 0)
        d = b.call(aten.matmul.default, a, b.call(aten.t.default, b.param("lora_embedding_B")))
        d = b.call(aten.mul.Tensor, d, b.param("scaling"))
        return b.cast(b.call(aten.add.Tensor, b.y, d), site.dtype)

    def merge_delta(self, site, state, weights):
        if site.kind == EMBEDDING:
            delta = widen(state.scaling) * (widen(state.lora_embedding_B) @ widen(state.lora_embedding_A))
            return {site.weight_name: delta.T}
        delta = widen(state.scaling) * (widen(state.lora_B) @ widen(state.lora_A))
        return {site.weight_name: delta if site.layout == "out_in" else delta.T}

    def saved_state(self, site, state, prefix):
        if site.kind == EMBEDDING:
            return {f"{prefix}lora_embedding_A": state.lora_embedding_A,
                    f"{prefix}lora_embedding_B": state.lora_embedding_B}
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

    def combine(self, sources, weights, how, rank):
        """PEFT's weighted combinations: ``"linear"`` (equal ranks: A and B are weighted
        sums, the weight's square root on each side, its sign on A), ``"cat"`` (ranks
        concatenated: the exact weighted sum of deltas) or ``"svd"`` (the weighted sum of
        the deltas truncated to ``rank``, default the largest rank). The new adapter has
        ``alpha = r`` (scaling 1), as in PEFT."""
        if how not in _COMBINATIONS:
            raise RuleError(f"combination_type={how!r}; use one of {_COMBINATIONS}")
        if any(not isinstance(p.state, LoRAState) for p in sources):
            raise RuleError("add_weighted_adapter combines LoRA adapters on linear ops only "
                            "(not other kinds, nor LoRA on embeddings)")
        ranks = {p.state.r for p in sources}
        if how == "linear" and len(ranks) != 1:
            raise RuleError(f"combination_type='linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
        rank_of: dict[str, int] = {}
        for p in sources:
            rank_of[p.adapter_name] = max(rank_of.get(p.adapter_name, 0), p.state.r)
        cat_rank = sum(rank_of[name] for name, _ in weights)  # a name given twice counts twice
        new_rank = {"linear": max(ranks), "cat": cat_rank, "svd": rank or max(ranks)}[how]
        by_site: dict[str, dict] = {}
        for p in sources:
            by_site.setdefault(p.site.weight_path, {})[p.adapter_name] = p
        values = {}
        for key, at_site in by_site.items():
            group = [(at_site[name], w) for name, w in weights if name in at_site]
            a, b = _combine(how, group, new_rank)
            values[key] = {"lora_A": a, "lora_B": b}
        return LoRA(r=new_rank, alpha=new_rank), values


def _combine(how: str, group: list, new_rank: int):
    """The new (A, B) at one site from ``(source placement, weight)`` pairs there, in the order named."""
    first = group[0][0].state
    a = torch.zeros(new_rank, first.lora_A.shape[1], dtype=first.lora_A.dtype, device=first.lora_A.device)
    b = torch.zeros(first.lora_B.shape[0], new_rank, dtype=first.lora_B.dtype, device=first.lora_B.device)
    if how == "linear":
        for p, w in group:
            ws = w * float(p.state.scaling)
            a += math.copysign(math.sqrt(abs(ws)), ws) * p.state.lora_A
            b += math.sqrt(abs(ws)) * p.state.lora_B
    elif how == "cat":
        parts_a = [w * float(p.state.scaling) * p.state.lora_A for p, w in group]
        parts_b = [p.state.lora_B for p, _ in group]
        cat_a, cat_b = torch.cat(parts_a, 0), torch.cat(parts_b, 1)
        a[: cat_a.shape[0]] = cat_a
        b[:, : cat_b.shape[1]] = cat_b
    else:
        delta = sum(w * float(p.state.scaling) * (p.state.lora_B @ p.state.lora_A) for p, w in group)
        u, s, vh = torch.linalg.svd(delta.float())
        b = (u[:, :new_rank] @ torch.diag(s[:new_rank])).to(b.dtype)
        a = vh[:new_rank].to(a.dtype)
        if b.shape[1] < new_rank:  # the delta's rank is below new_rank: pad with zeros
            b = torch.cat([b, b.new_zeros(b.shape[0], new_rank - b.shape[1])], 1)
            a = torch.cat([a, a.new_zeros(new_rank - a.shape[0], a.shape[1])], 0)
    return a, b


_PATTERN = r"(.*\.)?({})$"  # how PEFT matches rank_pattern / alpha_pattern keys to a module path


def _pattern_value(patterns: dict, paths: tuple[str, ...], default):
    for key, value in patterns.items():
        if any(re.match(_PATTERN.replace("{}", key), path) for path in paths):
            return value
    return default
