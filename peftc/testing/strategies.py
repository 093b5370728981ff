"""Hypothesis strategies: random small models, rules for them, and inputs.

::

    from peftc.testing import strategies as pst

    @given(case=pst.cases(adapters=st.builds(MyAdapter)))
    def test_merge(case):
        assert_merge_equivalent(*case)          # case = (model, rules, inputs)

Models are MLPs (``nn.Linear`` layers and bare ``x @ W`` layers, ``W`` stored
``[in, out]``; on request also ``F.linear`` and ``x @ W.T`` layers on a module's own
parameters) and small pre-norm transformer blocks with a hand-written
attention (``softmax(q @ k^T * scale)``) or ``scaled_dot_product_attention``,
and stacks of 1-, 2- or 3-D convolutions (:class:`TinyConvNet`).
Depth, widths, bias presence, dtype and weights (a drawn seed) are random, and
every part shrinks toward the smallest model: depth 1, width 1, float32,
``nn.Linear``, no bias.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from ..adapters.base import Adapter
from ..adapters.dora import DoRA
from ..adapters.lora import LoRA
from ..match import linear
from ..rules import Rule

__all__ = [
    "FORMS",
    "Case",
    "FunctionalLinear",
    "MatMulLinear",
    "MatMulTLinear",
    "TinyConvNet",
    "TinyMLP",
    "TinyTransformer",
    "cases",
    "conv_paths",
    "doras",
    "inputs",
    "linear_paths",
    "loras",
    "models",
    "rules",
]

DTYPES = (torch.float32, torch.float64)
# LayerNorm divides by the features' spread; over 3 or 4 random features that can be tiny and
# blow float32 rounding up past any tolerance. A large eps bounds the gain (1/sqrt(eps) ~ 3).
NORM_EPS = 0.1


# -- the models -------------------------------------------------------------------


class _OwnLinear(nn.Module):
    """A linear map on the module's own ``weight`` and ``bias`` (``bias`` None when absent)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, in_out: bool):
        super().__init__()
        shape = (d_in, d_out) if in_out else (d_out, d_in)
        self.weight = nn.Parameter(torch.randn(*shape) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1) if bias else None


class MatMulLinear(_OwnLinear):
    """``x @ W (+ b)`` with ``W`` stored ``[in, out]``: the graph's ``aten.matmul``, layout ``"in_out"``."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_out, bias, in_out=True)

    def forward(self, x):
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [out, in], bias or None)``: the layer as ``x W^T + b``, for reference computations."""
        return self.weight.T, self.bias


class FunctionalLinear(_OwnLinear):
    """``F.linear(x, W, b)`` with ``W`` stored ``[out, in]``: ``aten.linear``, layout ``"out_in"``."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_out, bias, in_out=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [out, in], bias or None)``, as :meth:`MatMulLinear.dense`."""
        return self.weight, self.bias


class MatMulTLinear(_OwnLinear):
    """``x @ W.T (+ b)`` with ``W`` stored ``[out, in]``: ``aten.matmul`` on a transpose, layout ``"out_in"``."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_out, bias, in_out=False)

    def forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [out, in], bias or None)``, as :meth:`MatMulLinear.dense`."""
        return self.weight, self.bias


#: MLP layer forms: ``nn.Linear``, ``x @ W`` (``[in, out]``), ``F.linear`` and ``x @ W.T`` (``[out, in]``).
FORMS = {"linear": nn.Linear, "matmul": MatMulLinear, "flinear": FunctionalLinear, "matmul_t": MatMulTLinear}


def _layer(form: str, d_in: int, d_out: int, bias: bool) -> nn.Module:
    if form not in FORMS:
        raise ValueError(f"unknown layer form {form!r}; use one of {sorted(FORMS)}")
    layer = FORMS[form](d_in, d_out, bias=bias)
    if form == "linear" and bias:  # nn.Linear's default bias init is tiny for small fan-in; make it count
        nn.init.normal_(layer.bias, std=0.1)
    return layer


class _Specced(nn.Module):
    """A model whose repr is its class name and ``spec``, the arguments that rebuild it."""

    spec: dict

    def __repr__(self):
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.spec.items()) + ")"


class _Stack(_Specced):
    """``layers`` in order, tanh between them."""

    layers: nn.ModuleList

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


class TinyMLP(_Stack):
    """``layers.i`` are linear maps of the given forms, tanh between them. Input ``[batch, widths[0]]``."""

    def __init__(self, widths: list[int], forms: list[str], biases: list[bool], seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = dict(widths=list(widths), forms=list(forms), biases=list(biases), seed=seed,
                         dtype=str(dtype).removeprefix("torch."))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(
                _layer(f, a, b, bias) for a, b, f, bias in zip(widths[:-1], widths[1:], forms, biases, strict=True)
            )
        self.to(dtype).eval()
        self.input_width, self.sequence = widths[0], False


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool, sdpa: bool):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=bias) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            scale = 1.0 / math.sqrt(q.shape[-1])
            o = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
        return self.o_proj(o.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, d: int, ff: int, bias: bool):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, ff, bias=bias), nn.Linear(ff, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, bias: bool, sdpa: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=NORM_EPS), nn.LayerNorm(d, eps=NORM_EPS)
        self.self_attn, self.mlp = Attention(d, heads, bias, sdpa), MLP(d, ff, bias)

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(_Specced):
    """Pre-norm blocks at ``model.layers.i`` (``self_attn.{q,k,v,o}_proj``, ``mlp.{up,down}_proj``)
    and an ``lm_head``. Input ``[batch, length, heads * head_dim]`` floats. LayerNorms use
    ``eps=NORM_EPS`` (0.1) so that rounding differences stay within tolerances."""

    def __init__(self, depth: int, heads: int, head_dim: int, ff: int, out: int, bias: bool,
                 sdpa: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = dict(depth=depth, heads=heads, head_dim=head_dim, ff=ff, out=out, bias=bias, sdpa=sdpa,
                         seed=seed, dtype=str(dtype).removeprefix("torch."))
        d = heads * head_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(Block(d, heads, ff, bias, sdpa) for _ in range(depth))
            self.model.norm = nn.LayerNorm(d, eps=NORM_EPS)
            self.lm_head = nn.Linear(d, out, bias=bias)
        self.to(dtype).eval()
        self.input_width, self.sequence = d, True

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class TinyConvNet(_Stack):
    """``layers.i`` are ``dims``-D convolutions, tanh between them; ``layers[i]`` is
    ``(out channels, kernel, stride, padding, bias)`` (padding an int or ``"same"``). Input
    ``[batch, channels, size, ...]`` (:attr:`input_shape`, batch None)."""

    def __init__(self, dims: int, channels: int, size: int, layers: list[tuple], seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = dict(dims=dims, channels=channels, size=size, layers=list(layers), seed=seed,
                         dtype=str(dtype).removeprefix("torch."))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            widths = [channels] + [out for out, *_ in layers]
            self.layers = nn.ModuleList(
                _CONVS[dims](a, out, kernel, stride, padding, bias=bias)
                for a, (out, kernel, stride, padding, bias) in zip(widths[:-1], layers, strict=True))
        self.to(dtype).eval()
        self.input_shape = (None, channels, *[size] * dims)


@st.composite
def _conv_net(draw, dtype, seed: int, depth: int, max_width: int, biases) -> TinyConvNet:
    """Kernels, strides and paddings drawn so that every layer's output keeps at least one element."""
    dims, channels = draw(st.integers(1, 3)), draw(st.integers(1, max_width))
    size = current = draw(st.integers(3, 6))
    layers = []
    for _ in range(depth):
        kernel = draw(st.integers(1, min(3, current)))
        stride = draw(st.integers(1, 2))
        padding = draw(st.sampled_from([0, kernel // 2] + (["same"] if stride == 1 else [])))
        layers.append((draw(st.integers(1, max_width)), kernel, stride, padding, draw(biases)))
        if padding != "same":
            current = (current + 2 * padding - kernel) // stride + 1
    return TinyConvNet(dims, channels, size, layers, seed, dtype)


# -- strategies -------------------------------------------------------------------


@st.composite
def models(draw, kinds=("mlp", "transformer"), dtypes=DTYPES, max_depth: int = 3, max_width: int = 8,
           forms=("linear", "matmul"), bias=None) -> nn.Module:
    """A random :class:`TinyMLP`, :class:`TinyTransformer` or :class:`TinyConvNet` in eval mode.

    Arguments:
        kinds: which of ``"mlp"``, ``"transformer"`` and ``"conv"`` to draw (``"conv"`` only
            when asked for: its sites are convolutions, which ``peftc.linear`` doesn't select).
        dtypes: parameter dtypes to draw from.
        max_depth: most layers (MLP) or blocks (transformer, at most 2).
        max_width: most features in any MLP layer, transformer feed-forward or head.
        forms: MLP layer forms (:data:`FORMS`): ``"linear"`` (``nn.Linear``, weight ``[out, in]``),
            ``"matmul"`` (``x @ W``, weight ``[in, out]``), ``"flinear"`` (``F.linear``) and
            ``"matmul_t"`` (``x @ W.T``), both on the layer's own ``[out, in]`` weight.
        bias: True / False for every layer, or None to draw it per layer.
    """
    kind = draw(st.sampled_from(list(kinds)))
    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(0, 2**16))
    depth = draw(st.integers(1, max_depth))
    biases = st.booleans() if bias is None else st.just(bias)
    if kind == "mlp":
        widths = draw(st.lists(st.integers(1, max_width), min_size=depth + 1, max_size=depth + 1))
        layer_forms = draw(st.lists(st.sampled_from(list(forms)), min_size=depth, max_size=depth))
        layer_biases = draw(st.lists(biases, min_size=depth, max_size=depth))
        return TinyMLP(widths, layer_forms, layer_biases, seed, dtype)
    if kind == "transformer":
        depth = min(depth, 2)  # blocks are the slow part to trace; two show every interaction
        heads = draw(st.integers(1, 2))
        # at least 3 features: LayerNorm maps 1 feature to 0 and 2 features to +-1, hiding any adapter
        head_dim = draw(st.integers(4 - heads, 4))
        ff = draw(st.integers(1, max_width))
        out = draw(st.integers(1, max_width))
        sdpa = draw(st.booleans())
        return TinyTransformer(depth, heads, head_dim, ff, out, draw(biases), sdpa, seed, dtype)
    if kind == "conv":
        return draw(_conv_net(dtype, seed, depth, max_width, biases))
    raise ValueError(f"unknown model kind {kind!r}; use 'mlp', 'transformer' or 'conv'")


def _dtype_of(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


@st.composite
def inputs(draw, model: nn.Module, max_batch: int = 3, max_length: int = 4, shape=None) -> tuple:
    """Positional inputs ``(x,)`` for ``model``, random values in the model's dtype.

    Sequences are at least 2 long: attention over one key ignores keys and
    queries, which would hide an adapter on ``q_proj`` or ``k_proj``.

    Works for models from :func:`models` (and any model with ``input_width``
    and ``sequence`` attributes, or an ``input_shape``) and for transformers text models (a dict
    with ``input_ids``). For other models give ``shape``, with None for a drawn
    size: ``shape=(None, 16)``.
    """
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    batch = draw(st.integers(1, max_batch))
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if shape is None and vocab is not None and not hasattr(model, "input_width"):
        length = draw(st.integers(min(2, max_length), max_length))
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        return {"input_ids": ids.to(device)}
    shape = shape if shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        width = getattr(model, "input_width", None)
        if width is None:
            raise ValueError(f"peftc.testing.inputs: can't tell {type(model).__name__}'s input shape; "
                             "pass shape=(None, width) (None is drawn)")
        shape = (None, None, width) if getattr(model, "sequence", False) else (None, width)
    sizes = [batch if i == 0 and s is None else draw(st.integers(min(2, max_length), max_length)) if s is None
             else s for i, s in enumerate(shape)]
    x = torch.randn(*sizes, generator=g, dtype=torch.float64).to(_dtype_of(model))
    return (x.to(device),)


def linear_paths(model: nn.Module) -> list[str]:
    """Module paths owning a 2-D ``weight`` parameter (linear layers, ``x @ W`` layers, GPT-2's Conv1D)."""
    out = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if name and isinstance(w, nn.Parameter) and w.dim() == 2 and not isinstance(module, nn.Embedding):
            out.append(name)
    return out


def conv_paths(model: nn.Module) -> list[str]:
    """Module paths of the model's convolutions (``nn.Conv1d/2d/3d``)."""
    return [name for name, module in model.named_modules() if isinstance(module, tuple(_CONVS.values()))]


def loras(max_r: int = 4, use_rslora: bool | None = None) -> st.SearchStrategy[LoRA]:
    """LoRA specs with random rank and alpha, and ``init=False`` (B random, so merging does something).

    ``use_rslora``: True / False, or None to draw it (PEFT's format can't save a
    mix of rsLoRA and plain LoRA in one adapter: fix it for save/load tests).
    """
    rslora = st.booleans() if use_rslora is None else st.just(use_rslora)
    return st.builds(LoRA, r=st.integers(1, max_r), alpha=st.sampled_from([1, 2, 8, 16.5]),
                     init=st.just(False), use_rslora=rslora)


def doras(max_r: int = 4) -> st.SearchStrategy[DoRA]:
    """DoRA specs as :func:`loras` draws them (``init=False``: the magnitude starts at the norms
    of ``W + s BA``, so merging changes the weights' directions as well as their lengths)."""
    return st.builds(DoRA, r=st.integers(1, max_r), alpha=st.sampled_from([1, 2, 8, 16.5]),
                     init=st.just(False), use_rslora=st.booleans())


@st.composite
def rules(draw, model: nn.Module, adapters: st.SearchStrategy[Adapter] | None = None, select=linear,
          paths: list[str] | None = None, max_rules: int = 2) -> list[Rule]:
    """One to ``max_rules`` rules over a random non-empty subset of ``model``'s sites.

    Arguments:
        adapters: a strategy of adapter specs (default :func:`loras`); each rule draws one.
        select: makes a selector from a regex of module paths (``peftc.linear``,
            ``peftc.module``...). Rules are ``adapter.on(select("a|b"))``.
        paths: the module paths to choose from (default :func:`linear_paths`, or
            :func:`conv_paths` for a model without linear layers).
    """
    adapters = adapters if adapters is not None else loras()
    candidates = list(paths) if paths is not None else linear_paths(model) or conv_paths(model)
    if not candidates:
        raise ValueError(f"peftc.testing.rules: {type(model).__name__} has no linear layers or convolutions; pass paths=[...]")
    chosen = draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True))
    chosen.sort(key=candidates.index)
    n = draw(st.integers(1, max(1, min(max_rules, len(chosen)))))
    bounds = sorted(draw(st.lists(st.integers(1, len(chosen) - 1), min_size=n - 1, max_size=n - 1,
                                  unique=True))) if n > 1 else []
    groups = [chosen[a:b] for a, b in zip([0, *bounds], [*bounds, len(chosen)], strict=True)]
    return [draw(adapters).on(select("|".join(re.escape(p) for p in group))) for group in groups]


class Case(NamedTuple):
    """A model, rules for it, and inputs: ``assert_merge_equivalent(*case)``."""

    model: nn.Module
    rules: list
    inputs: tuple


@st.composite
def cases(draw, adapters: st.SearchStrategy[Adapter] | None = None, select=linear, model_strategy=None,
          **model_options) -> Case:
    """A :class:`Case`: a model from ``model_strategy`` (default :func:`models` with
    ``model_options``), :func:`rules` for it with ``adapters``, and :func:`inputs`."""
    model = draw(model_strategy if model_strategy is not None else models(**model_options))
    return Case(model, draw(rules(model, adapters, select)), draw(inputs(model)))
