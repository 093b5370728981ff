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

At a convolution (Conv1d/2d/3d; PEFT's ``lora_A`` a convolution to ``r`` channels with the
base's kernel, stride and padding, ``lora_B`` a pointwise one with the base's groups)::

    y = aten.conv2d(x, W, b, s, p, d, g)   y  = aten.conv2d(x, W, b, s, p, d, g)
                                    ==>    xd = aten.dropout(where(gate, x, 0), p, True)   # training only
                                           a  = aten.conv2d(xd, lora_A, None, s, p, 1, 1)  # [r, in, *kernel]
                                           d  = aten.conv2d(a, lora_B, None, 1, 0, 1, g)   # [out, r / g, 1, 1]
                                           y2 = aten.add(y, aten.mul(d, scaling))
                                           y3 = aten.where(gate, y2, y)                    # per row (peftc adds it)

Merging adds ``scaling * B A`` over the channels, ``[out, in, *kernel]``: the two convolutions
in one, exact because ``lora_B`` is pointwise. With groups > 1 the sum isn't a grouped
kernel, and merging is refused, as PEFT refuses it.

At a stack of experts (``W[E, out, in]`` read by batched or grouped matmuls; see
:mod:`peftc.sites`) each adapted expert ``e`` has its own pair, held in PEFT's layout:
``lora_A [k*r, in]`` (rows ``e*r .. e*r+r``) and ``lora_B [out, r*k]`` (columns ``j*k + e``),
for the ``k`` experts adapted (all, unless a selector picked some: ``peftc.experts(indices=...)``).
The weight every matmul of the stack reads becomes ``W + scaling * B_e A_e`` per expert, as
PEFT's ``target_parameters`` does (no dropout, as in PEFT)::

    W = get_attr(experts.gate_up_proj)     W  = get_attr(experts.gate_up_proj)
                                    ==>    a  = aten.view(lora_A, [k, r, in])
                                           b  = aten.permute(aten.view(lora_B, [out, r, k]), [2, 0, 1])
                                           W2 = aten.baddbmm(W, b * scaling, a)      # or index_add(W, 0, ids, bmm)

with ``lora_A`` and ``lora_B`` first selected by the gate (``where(gate, A, 0)``): the small
factors, not the whole weight, so an inactive adapter adds exact zeros.

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

from ..errors import MergeError, RuleError
from ..sites import CONVOLUTION, EXPERTS
from ..storage import is_packed, read_as
from .base import Adapter, check_rank_alpha, conv_refusal, pattern_value, widen

aten = torch.ops.aten
EMBEDDING = "embedding"  # the site kind of an aten.embedding lookup

_INITS = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_<K>"
_NITER = re.compile(r"pissa_niter_(\d+)")
_COMBINATIONS = ("linear", "cat", "svd")


class _LowRank(nn.Module):
    """A low-rank pair ``A [capacity, ...]``, ``B [..., capacity]`` holding rank ``r`` in its
    leading rows of A and columns of B; the rest is zero (a reserved slot: :class:`peftc.Reserve`)."""

    _a: str
    _b: str

    def __init__(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], scaling: float, dtype):
        super().__init__()
        setattr(self, self._a, nn.Parameter(torch.empty(a_shape, dtype=dtype)))
        setattr(self, self._b, nn.Parameter(torch.empty(b_shape, dtype=dtype)))
        self.register_buffer("scaling", torch.tensor(scaling, dtype=dtype))
        self.r = a_shape[0]  # the adapter's rank: what it saves, merges and combines

    @property
    def capacity(self) -> int:
        """The rank the tensors have room for (the graph's); ``r`` or more."""
        return getattr(self, self._a).shape[0]

    def write(self, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor) -> None:
        """Hold the pair ``(a, b)`` of rank ``a.shape[0]``, zero-padded to the capacity, in place."""
        room_a, room_b = getattr(self, self._a), getattr(self, self._b)
        with torch.no_grad():
            room_a.zero_()
            room_b.zero_()
            room_a[: a.shape[0]].copy_(a)
            room_b[:, : b.shape[1]].copy_(b)
            self.scaling.copy_(scaling)
        self.r = a.shape[0]

    def clear(self) -> None:
        """Rank 0: every value zero, the scaling too."""
        a, b = getattr(self, self._a), getattr(self, self._b)
        self.write(a[:0], b[:, :0], torch.zeros_like(self.scaling))

    def real(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` at the adapter's rank: the tensors themselves unless padded, else views."""
        a, b = getattr(self, self._a), getattr(self, self._b)
        if self.r == self.capacity:
            return a, b
        with torch.no_grad():  # views a load may write through (a slice of a trainable tensor is no leaf)
            return a[: self.r], b[:, : self.r]


class LoRAState(_LowRank):
    """The low-rank pair at one site, with its scaling as a buffer."""

    _a, _b = "lora_A", "lora_B"

    def __init__(self, r: int, in_features: int, out_features: int, scaling: float, dtype):
        super().__init__((r, in_features), (out_features, r), scaling, dtype)


class LoRAEmbeddingState(_LowRank):
    """The low-rank pair at one embedding lookup, with PEFT's names and layouts."""

    _a, _b = "lora_embedding_A", "lora_embedding_B"

    def __init__(self, r: int, rows: int, width: int, scaling: float, dtype):
        super().__init__((r, rows), (width, r), scaling, dtype)


class LoRAConvState(_LowRank):
    """The pair at one convolution, as PEFT's ``lora_A`` ``[r, in, *kernel]`` and pointwise
    ``lora_B`` ``[out, r / groups, 1, ...]`` convolution weights."""

    _a, _b = "lora_A", "lora_B"

    def __init__(self, r: int, site, scaling: float, dtype):
        conv = site.conv
        super().__init__((r, site.in_features, *conv.kernel), (site.out_features, r // conv.groups, *[1] * conv.dims),
                         scaling, dtype)


class LoRAExpertsState(_LowRank):
    """One low-rank pair per adapted expert of a stack, in PEFT's layout (see the module docstring).

    Attributes:
        r: the rank of each expert's pair.
        experts: the adapted experts' indices, as a buffer (read by the graph when they are
            not all of them).
        nesting: how many other adapted stacks of the same module come after this one in
            the module's parameter order: PEFT nests one wrapper per stack, so this one's
            saved keys carry that many ``base_layer.`` parts.
    """

    _a, _b = "lora_A", "lora_B"

    def __init__(self, r: int, experts: list[int], in_features: int, out_features: int, scaling: float, dtype):
        super().__init__((r * len(experts), in_features), (out_features, r * len(experts)), scaling, dtype)
        self.register_buffer("experts", torch.tensor(experts, dtype=torch.long))
        self.r, self.nesting = r, 0

    @property
    def count(self) -> int:
        return len(self.experts)

    def real(self):
        return self.lora_A, self.lora_B

    def write(self, a, b, scaling):
        """Hold the pairs ``(a, b)``, of this state's shapes (a stack's pairs are never padded)."""
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
            self.scaling.copy_(scaling)

    def clear(self):
        self.write(torch.zeros_like(self.lora_A), torch.zeros_like(self.lora_B), torch.zeros_like(self.scaling))

    def delta(self) -> torch.Tensor:
        """``scaling * B_e A_e`` of each adapted expert, ``[k, out, in]``, widened (see :func:`widen`)."""
        a = widen(self.lora_A).reshape(self.count, self.r, -1)
        b = widen(self.lora_B).reshape(self.lora_B.shape[0], self.r, self.count).permute(2, 0, 1)
        return widen(self.scaling) * (b @ a)


class LoRA(Adapter):
    """Low-rank adaptation of linear-like ops, embedding lookups and convolutions.

    Arguments:
        r: rank, > 0.
        alpha: scaling numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout probability on the adapter input, in training mode only.
        init: ``True`` (A Kaiming-uniform, B zeros), ``"gaussian"`` (A normal
            with std 1/r, B zeros) or ``False`` (both Kaiming-uniform: the
            adapter is not a no-op at the start); or, on linear ops, one that
            starts from the weight and leaves the base weight the residual
            ``W - scaling * B A`` (:attr:`changes_base`): ``"pissa"`` (the top
            ``r`` singular triplets, ``B = U sqrt(S/scaling)``, ``A = sqrt(S/scaling) V^T``),
            ``"pissa_niter_K"`` (the same by ``torch.svd_lowrank`` with ``K``
            iterations: random) or ``"olora"`` (``W = QR``: ``B = Q[:, :r]``, ``A = R[:r]``).
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
        check_rank_alpha("LoRA", r, alpha, self.rank_pattern, self.alpha_pattern)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise RuleError(f"LoRA dropout={dropout!r} must be in [0, 1)")
        if init not in _INITS and not (isinstance(init, str) and _NITER.fullmatch(init)):
            raise RuleError(f"LoRA init={init!r} must be one of {_INITS} or 'pissa_niter_<K>'")

    def rank_and_alpha(self, site) -> tuple[int, float]:
        """The site's rank and alpha: a pattern matching its module path, or the key it is saved
        under (a bare parameter's weight path), else the defaults."""
        return pattern_value(self.rank_pattern, site, self.r), pattern_value(self.alpha_pattern, site, self.alpha)

    def scaling(self, site) -> float:
        r, alpha = self.rank_and_alpha(site)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def unsupported(self, site):
        if site.kind == CONVOLUTION:
            return self._unsupported_conv(site)
        if site.kind == EXPERTS:
            if self.dropout or self.changes_base:
                return (f"LoRA on a stack of experts takes no dropout and no PiSSA/OLoRA init (PEFT's neither), "
                        f"got dropout={self.dropout}, init={self.init!r}; use dropout=0 and init=True there")
            return None
        if not site.is_linear and site.kind != EMBEDDING:
            return (f"LoRA supports linear-like ops (linear, addmm, mm, matmul), embedding lookups, convolutions "
                    f"and stacks of experts, not {site.op}")
        return None

    def _unsupported_conv(self, site) -> str | None:
        """Why PEFT's LoRA for Conv1d/2d/3d doesn't fit this convolution, if it doesn't."""
        conv, (r, _) = site.conv, self.rank_and_alpha(site)
        leave_out = f"leave {site.path} out of the targets"
        why = conv_refusal(site, "LoRA")
        if why:
            return why
        if any(d != 1 for d in conv.dilation) and any(k != 1 for k in conv.kernel):
            return (f"its dilation is {conv.dilation}; PEFT's lora_A takes the kernel, stride and padding but not "
                    f"the dilation, so its output doesn't fit the convolution's; {leave_out}")
        if r % conv.groups:
            return (f"its groups={conv.groups} don't divide the rank {r}, as PEFT requires; use a multiple of "
                    f"{conv.groups} (rank_pattern can set one for {site.path}) or {leave_out}")
        if self.changes_base:
            return f"init={self.init!r} starts from linear weights only; use init=True there or {leave_out}"
        return None

    @property
    def changes_base(self) -> bool:
        return isinstance(self.init, str) and self.init != "gaussian"

    def init_states(self, sites, model):
        """PiSSA and OLoRA start from each site's weight; the other inits don't read it.
        A stack of experts learns how PEFT nests it among the module's other adapted stacks."""
        states = super().init_states(sites, model)
        stacks: dict[str, list[str]] = {}
        for site in sites:
            if site.kind == EXPERTS:
                stacks.setdefault(site.path, []).append(site.weight_name)
        for site, (_, state) in zip(sites, states, strict=True):
            if site.kind == EXPERTS:  # PEFT wraps a module's parameters in their order, the first innermost
                order = [n for n, _ in model.get_submodule(site.path).named_parameters(recurse=False)
                         if n in stacks[site.path]]
                state.nesting = len(order) - 1 - order.index(site.weight_name)
        if self.changes_base:
            for site, (_, state) in zip(sites, states, strict=True):
                self._from_weight(site, state, model.get_parameter(site.weight_path))
        return states

    @torch.no_grad()
    def _from_weight(self, site, state, weight) -> None:
        """PEFT's PiSSA / OLoRA factors of ``weight`` (float32, ``[out, in]``) into ``state``."""
        if site.kind == EMBEDDING or is_packed(weight) or weight.dtype not in (
                torch.float32, torch.float16, torch.bfloat16):
            what = "an embedding" if site.kind == EMBEDDING else f"a {read_as(weight)[1]} weight"
            raise RuleError(f"LoRA init={self.init!r} at {site.path}: peftc starts PiSSA/OLoRA from "
                            f"float32/float16/bfloat16 linear weights only, not {what}; use init=True there, "
                            "or initialise before quantizing")
        if self.init == "olora" and site.layout != "out_in":
            raise RuleError(f"LoRA init='olora' at {site.path}: its weight is stored [in, out] (Conv1D, x @ W), "
                            "where PEFT's OLoRA factors the wrong side; use init='pissa' or True")
        w, r, s = weight.detach().float(), state.r, self.scaling(site)  # a Python float, as PEFT's
        if r > min(w.shape):
            raise RuleError(f"LoRA init={self.init!r} at {site.path}: rank {r} exceeds the weight's "
                            f"{min(w.shape)}; lower r")
        if self.init == "olora":
            q, rr = torch.linalg.qr(w)
            b, a = q[:, :r], rr[:r]
        else:
            w = w if site.layout == "out_in" else w.T
            if self.init == "pissa":
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                u, sv, vh = u[:, :r], sv[:r] / s, vh[:r]
            else:
                u, sv, v = torch.svd_lowrank(w, r, niter=int(_NITER.fullmatch(self.init).group(1)))
                sv, vh = sv / s, v.t()
            a, b = torch.diag(torch.sqrt(sv)) @ vh, u @ torch.diag(torch.sqrt(sv))
        state.lora_A.copy_(a.contiguous())
        state.lora_B.copy_(b.contiguous())

    def init_state(self, site) -> LoRAState | LoRAEmbeddingState | LoRAConvState | LoRAExpertsState:
        r, _ = self.rank_and_alpha(site)
        dtype = site.dtype if site.dtype == torch.float64 else torch.float32
        if site.kind == EXPERTS:  # PEFT's init of its [k*r, in] and [out, k*r] pair, as on a linear
            experts = list(range(site.experts)) if site.expert_ids is None else list(site.expert_ids)
            state = LoRAExpertsState(r, experts, site.in_features, site.out_features, self.scaling(site), dtype)
            self._init_pair(state.lora_A, state.lora_B, r)
            return state
        if site.kind == EMBEDDING:  # PEFT: A zeros and B normal, or (init=False) both normal
            state = LoRAEmbeddingState(r, site.in_features, site.out_features, self.scaling(site), dtype)
            with torch.no_grad():
                nn.init.normal_(state.lora_embedding_B)
                if self.init is False:
                    nn.init.normal_(state.lora_embedding_A)
                else:
                    nn.init.zeros_(state.lora_embedding_A)
            return state
        if site.kind == CONVOLUTION:
            state = LoRAConvState(r, site, self.scaling(site), dtype)
        else:
            state = LoRAState(r, site.in_features, site.out_features, self.scaling(site), dtype)
        if not self.changes_base:  # else filled from the weight by init_states
            self._init_pair(state.lora_A, state.lora_B, r)
        return state

    @torch.no_grad()
    def _init_pair(self, a: torch.Tensor, b: torch.Tensor, r: int) -> None:
        """PEFT's init of a linear pair: A Kaiming-uniform (or normal, std 1/r), B zeros (or Kaiming-uniform)."""
        if self.init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if self.init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def emit(self, b, site):
        if site.kind == EMBEDDING:
            return self._emit_embedding(b, site)
        if site.kind == CONVOLUTION:
            return self._emit_conv(b, site)
        if site.kind == EXPERTS:
            return self._emit_experts(b, site)
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

    def _emit_conv(self, b, site):
        """``y + scaling * B(A(dropout(x)))``: A with the base's kernel, stride and padding, B pointwise."""
        conv, ones = site.conv, [1] * site.conv.dims
        x = b.cast(b.x, b.state.lora_A.dtype)
        if b.training:  # an inactive adapter's rows pass no gradient, even 0 * NaN
            x = b.call(aten.where.ScalarOther, b.row_mask(b.x), x, 0)
        if b.training and self.dropout > 0:
            x = b.call(aten.dropout.default, x, self.dropout, True)
        padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
        a = b.call(conv.op(padding), x, b.param("lora_A"), None, list(conv.stride), padding, ones, 1)
        zeros = [0] * conv.dims
        d = b.call(conv.op(zeros), a, b.param("lora_B"), None, ones, zeros, ones, conv.groups)
        d = b.call(aten.mul.Tensor, d, b.param("scaling"))
        return b.cast(b.call(aten.add.Tensor, b.y, d), site.dtype)

    def gates_itself_at(self, site):
        return site.kind == EXPERTS

    def _emit_experts(self, b, site):
        """The stack's weight plus each adapted expert's ``scaling * B_e A_e`` (in its layout), in one
        ``baddbmm`` over the weight when every expert is adapted. The gate selects the factors or
        zeros (never multiplies), so an inactive adapter adds exact zeros and passes no gradient."""
        state = b.state
        k, r = state.count, state.r
        a, lb = b.param("lora_A"), b.param("lora_B")
        a, lb = b.gated(a, a, 2), b.call(aten.mul.Tensor, b.gated(lb, lb, 2), b.param("scaling"))
        a = b.cast(b.call(aten.view.default, a, [k, r, site.in_features]), site.dtype)
        lb = b.call(aten.view.default, b.cast(lb, site.dtype), [site.out_features, r, k])
        lb = b.call(aten.permute.default, lb, [2, 0, 1])  # [k, out, r]
        left, right = (lb, a) if site.layout == "out_in" else (b.call(aten.transpose.int, a, 1, 2),
                                                               b.call(aten.transpose.int, lb, 1, 2))
        if k == site.experts:
            return b.call(aten.baddbmm.default, b.y, left, right)
        return b.call(aten.index_add.default, b.y, 0, b.param("experts"), b.call(aten.bmm.default, left, right))

    def merge_delta(self, site, state, weights):
        if site.kind == EXPERTS:
            delta = state.delta()
            delta = delta if site.layout == "out_in" else delta.transpose(1, 2)
            full = torch.zeros_like(weights[site.weight_name]).index_add(0, state.experts, delta)
            return {site.weight_name: full}
        a, b = state.real()
        if site.kind == CONVOLUTION:
            if site.conv.groups > 1:
                raise MergeError(f"LoRA on {site.path}, a convolution with groups={site.conv.groups}, can't merge: "
                                 "its delta isn't a grouped kernel (PEFT refuses it too); use the adapter unmerged")
            delta = widen(b).flatten(1) @ widen(a).flatten(1)  # [out, r] @ [r, in * prod(kernel)]
            return {site.weight_name: widen(state.scaling) * delta.view(site.out_features, *a.shape[1:])}
        delta = widen(state.scaling) * (widen(b) @ widen(a))
        if site.kind == EMBEDDING:
            return {site.weight_name: delta.T}
        return {site.weight_name: delta if site.layout == "out_in" else delta.T}

    def saved_state(self, site, state, prefix):
        a, b = state.real()  # the adapter's own rank, as PEFT saves it, in a reserved slot too
        if site.kind == EMBEDDING:
            return {f"{prefix}lora_embedding_A": a, f"{prefix}lora_embedding_B": b}
        if site.kind == EXPERTS:  # PEFT's key: the module's, inside as many wrappers as stacks come after
            prefix = prefix.removesuffix(f"{site.weight_name}.") + "base_layer." * state.nesting
        return {f"{prefix}lora_A.weight": a, f"{prefix}lora_B.weight": b}

    def reserved(self, max_rank):
        """Room for any LoRA of rank ``max_rank`` or less with this dropout (a graph constant)."""
        return LoRA(r=max_rank, alpha=max_rank, dropout=self.dropout)

    def misfit(self, site, room, state):
        if not isinstance(room, LoRA):
            return f"{self!r} can't replace {room!r}"
        if site.kind == EXPERTS and (self.rank_and_alpha(site)[0] != state.r):
            return (f"its rank {self.rank_and_alpha(site)[0]} at the stack of experts {site.path} differs from "
                    f"the rank {state.r} there: a stack's pairs can't be padded")
        if self.dropout != room.dropout:
            return (f"its dropout {self.dropout} differs from {room.dropout}, which the graph was built with "
                    "(dropout is a constant of the training graph)")
        r, _ = self.rank_and_alpha(site)
        if r > state.capacity:
            return f"its rank {r} at {site.path} exceeds the rank {state.capacity} the graph holds there"
        if site.kind == CONVOLUTION and site.conv.groups > 1 and r != state.capacity:
            return (f"{site.path} is a convolution with groups={site.conv.groups}, whose lora_B splits the rank by "
                    f"group: a rank {r} can't be padded to the graph's {state.capacity}; reserve rank {r} exactly")
        return None

    def fill(self, site, room, state):
        """``state``'s pair in the leading rank rows of ``room``'s, zeros after: ``B A`` is unchanged
        (the zero rows add exact zeros, and their gradients are zero, so they stay zero)."""
        room.write(*state.real(), state.scaling)

    def clear(self, state):
        state.clear()

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
                            "(not other kinds, nor LoRA on embeddings, convolutions or stacks of experts)")
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
            pa, pb = p.state.real()
            a += math.copysign(math.sqrt(abs(ws)), ws) * pa
            b += math.sqrt(abs(ws)) * pb
    elif how == "cat":
        parts_a = [w * float(p.state.scaling) * p.state.real()[0] for p, w in group]
        parts_b = [p.state.real()[1] for p, _ in group]
        cat_a, cat_b = torch.cat(parts_a, 0), torch.cat(parts_b, 1)
        a[: cat_a.shape[0]] = cat_a
        b[:, : cat_b.shape[1]] = cat_b
    else:
        delta = sum(w * float(p.state.scaling) * (p.state.real()[1] @ p.state.real()[0]) for p, w in group)
        u, s, vh = torch.linalg.svd(delta.float())
        b = (u[:, :new_rank] @ torch.diag(s[:new_rank])).to(b.dtype)
        a = vh[:new_rank].to(a.dtype)
        if b.shape[1] < new_rank:  # the delta's rank is below new_rank: pad with zeros
            b = torch.cat([b, b.new_zeros(b.shape[0], new_rank - b.shape[1])], 1)
            a = torch.cat([a, a.new_zeros(new_rank - a.shape[0], a.shape[1])], 0)
    return a, b

