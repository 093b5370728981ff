"""Find the places in a traced graph where an op consumes a model parameter.

A *site* is one weight of the user's model together with every graph node that
uses it as an op operand, for example ``model.layers.0.self_attn.q_proj.weight``
read by one ``aten.linear``. Selectors choose among sites; adapters attach to them.

Linear-like ops are recognised in every form models write them::

    aten.linear(x, W[out,in], b)         nn.Linear, F.linear          layout "out_in"
    aten.addmm(b, x, W[in,out])          GPT-2's Conv1D               layout "in_out"
    aten.matmul(x, W[in,out]) / mm       a bare x @ W                 layout "in_out"
    aten.matmul(x, t(W[out,in])) / mm    x @ W.T                      layout "out_in"

Convolutions (``aten.conv1d/2d/3d``, their ``padding="same"`` overloads, ``aten.convolution``
and the transposed ones) are ``"convolution"`` sites, one per weight, with their bias and
geometry (:class:`Conv`) read from the op's arguments.

A stack of experts (a 3-D weight ``W[E, ...]``, transformers 5's fused MoE experts) is
a site of kind ``"experts"`` when every read of it reaches a batched matmul through
expert-picking and transposing views only, whatever the experts' code is::

    grouped_mm(x, transpose(W[E,out,in], -2, -1), offs)    grouped_mm experts    layout "out_in"
    bmm(index(W[E,out,in], [ids]), x[..., None])            batched_mm experts    layout "out_in"
    linear(x, select(W[E,out,in], 0, e))                    one expert's linear   layout "out_in"
    bmm(x, index(W[E,in,out], [ids]))                       transposed storage    layout "in_out"

Its nodes are the weight's reads (``get_attr``), so an adapter there rewrites the weight
every matmul of the stack sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .storage import read_as

aten = torch.ops.aten

LINEAR = "linear"
ATTENTION = "attention"
CONVOLUTION = "convolution"
_CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
EXPERTS = "experts"
_SDPA = {aten.scaled_dot_product_attention.default}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
# Between an eager attention's q @ k^T and its softmax: scaling, soft-capping, masks and biases, casts, views.
_SCORE_OPS = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar,
              aten.div.Tensor, aten.div.Scalar, aten.tanh.default, aten._to_copy.default, aten.to.dtype,
              aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.view.default,
              aten.reshape.default, aten._unsafe_view.default, aten.clone.default, aten.contiguous.default,
              aten.alias.default}
_SCORES = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


@dataclass(frozen=True)
class Conv:
    """How a convolution op applies its weight (each tuple has one entry per spatial dim).

    Attributes:
        kernel: the kernel's size.
        stride, dilation: as the op has them.
        padding: per dim, or ``"same"`` / ``"valid"``.
        groups: the op's groups.
        transposed: a transposed convolution (``ConvTranspose``).
        padding_mode: the module's ``padding_mode`` (``"zeros"`` unless it pads by itself).
    """

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    transposed: bool
    padding_mode: str = "zeros"

    @property
    def dims(self) -> int:
        return len(self.kernel)

    def op(self, padding: tuple[int, ...] | list[int] | str):
        """The ``aten.conv1d/2d/3d`` overload (non-transposed) that takes ``padding``: ``.padding``
        for ``"same"``/``"valid"``, else ``.default``."""
        family = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[self.dims]
        return family.padding if isinstance(padding, str) else family.default


@dataclass
class Site:
    """One model weight and the graph nodes that use it.

    Attributes:
        path: module path in the user's model (``model.layers.0.mlp.up_proj``).
        weight_name: the parameter's name inside that module (``weight``).
        kind: ``"linear"`` for linear-like ops, ``"experts"`` for a stack of experts,
            ``"attention"``; otherwise the ATen op name (``"embedding"``, ``"convolution"``...).
        op: the ATen op of the first node (``aten.linear.default``).
        layout: ``"out_in"`` or ``"in_out"``: how the weight is stored for linear ops.
        in_features, out_features: the linear map's sizes; for an ``"embedding"`` lookup,
            the table's rows and width; for a ``"convolution"``, its in and out channels; 0 otherwise.
        dtype, device: the weight's.
        layer: the layer index of ``path`` (PEFT's rule), or None.
        nodes: names of the graph nodes at this site, in graph order.
        conv: a ``"convolution"`` site's geometry, else None.
        has_bias: whether the op adds a bias.
        bias_name: the bias parameter's name in the module (None if it has none).
        heads, head_dim: key heads and head size at an ``"attention"`` site (heads 0 where
            the op's shapes fold them into the batch, as BLOOM's ``baddbmm`` does).
        cross: at an ``"attention"`` site, whether its keys come from another sequence than
            its queries (cross-attention: key and query lengths differ by more than a constant).
        encoder: whether the site is in an encoder-decoder model's encoder.
        input_embedding: whether this is the lookup of the model's input embeddings.
        experts: at an ``"experts"`` site, how many experts the stack holds (its weight's
            first dim); ``in_features`` and ``out_features`` are then each expert's.
        expert_ids: the experts of the stack a selector picked (``peftc.experts(indices=...)``);
            None: all of them.
        projections: at an ``"attention"`` site, the module paths of the linear ops that
            make its ``"key"`` and ``"value"`` and take its ``"output"``, where one op
            does (see :func:`attention_projections`); ``"output_bias"`` when the output
            projection adds a bias.
    """

    path: str
    weight_name: str
    kind: str
    op: str
    layout: str = "out_in"
    in_features: int = 0
    out_features: int = 0
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    layer: int | None = None
    nodes: list[str] = field(default_factory=list)
    conv: Conv | None = None
    has_bias: bool = False
    bias_name: str | None = None
    heads: int = 0
    head_dim: int = 0
    input_embedding: bool = False
    cross: bool = False
    encoder: bool = False
    projections: dict[str, str] = field(default_factory=dict)
    experts: int = 0
    expert_ids: tuple[int, ...] | None = None

    @property
    def weight_path(self) -> str:
        """The site's key: its weight's full name (its module path for attention sites)."""
        if not self.weight_name:
            return self.path
        return f"{self.path}.{self.weight_name}" if self.path else self.weight_name

    @property
    def bias_name_or_default(self) -> str:
        return self.bias_name or "bias"

    @property
    def key(self) -> str:
        """Where the site's state lives and is saved: its module path, or its weight
        path when the weight isn't called ``weight``."""
        if not self.path:
            return self.weight_name
        return self.path if self.weight_name in ("weight", "") else self.weight_path

    @property
    def is_linear(self) -> bool:
        return self.kind == LINEAR

    def __str__(self) -> str:
        shape = f"{self.in_features}->{self.out_features}" if self.is_linear else self.kind
        if self.kind == ATTENTION:
            shape = f"{self.heads} heads x {self.head_dim}"
        if self.conv is not None:
            shape = f"{self.in_features}->{self.out_features} kernel {self.conv.kernel}"
        if self.kind == EXPERTS:
            shape = f"{self.experts} experts x {self.in_features}->{self.out_features}"
        return f"{self.path} [{self.op} {shape}]"


def layer_index(path: str, layers_pattern: str | list[str] | None = None) -> int | None:
    """The layer number in a module path, by PEFT's rule.

    Without ``layers_pattern`` it is the first ``.N.`` that follows at least
    one dotted component; with it, the first ``N`` in ``<pattern>.N.``.
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", path)
        return int(m.group(1)) if m else None
    for pattern in patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if m:
            return int(m.group(1))
    return None


@dataclass
class LinearUse:
    """How one linear-like node reads its input, weight and bias."""

    input_index: int
    weight: fx.Node  # the get_attr node of the parameter
    layout: str
    bias_index: int | None


def linear_use(node: fx.Node) -> LinearUse | None:
    """If ``node`` is a linear-like op with a parameter weight, describe it."""
    if node.op != "call_function":
        return None
    args = node.args
    if node.target == aten.linear.default:
        bias = 2 if len(args) > 2 and args[2] is not None else None
        return LinearUse(0, args[1], "out_in", bias) if _param(args[1]) else None
    if node.target == aten.addmm.default and _param(args[2]):
        return LinearUse(1, args[2], "in_out", 0)
    if node.target in (aten.matmul.default, aten.mm.default):
        w = args[1]
        if _param(w):
            return LinearUse(0, w, "in_out", None)
        if isinstance(w, fx.Node) and w.target in _TRANSPOSES and _param(w.args[0]):
            if _is_last_two_swap(w) and w.args[0].meta["val"].dim() == 2:
                return LinearUse(0, w.args[0], "out_in", None)
    return None


def _param(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _is_last_two_swap(node: fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target == aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return list(node.args[1]) in ([1, 0], [-1, -2])


def input_embeddings_of(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()``; None for a model without input embeddings (a plain
    module, or a transformers vision model, whose method raises NotImplementedError)."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None

# Views an expert stack is read through before its matmul: they pick experts (dim 0) or cast,
# and keep each expert's matrix, perhaps transposed (``_flips``).
_EXPERT_VIEWS = {aten.transpose.int, aten.permute.default, aten.index.Tensor, aten.select.int,
                 aten.to.dtype, aten._to_copy.default, aten.contiguous.default, aten.clone.default,
                 aten.alias.default, aten.detach.default}
_BATCHED = {aten.bmm.default, aten.matmul.default, aten.mm.default, aten._grouped_mm.default}


def expert_layout(weight: fx.Node) -> tuple[str, fx.Node] | None:
    """How a 3-D weight ``W[E, a, b]`` is read, if every read is a batched matmul over
    its experts: ``(layout, first matmul)``, the layout ``"out_in"`` when ``a`` is each
    expert's output size (``W[e] @ x`` or ``x @ W[e].T``), ``"in_out"`` when it is the input size."""
    val = weight.meta.get("val")
    if val is None or val.dim() != 3:
        return None
    layouts, first, todo = set(), None, [(weight, u, False) for u in weight.users]
    while todo:
        src, user, flipped = todo.pop()
        if user.op != "call_function":
            return None
        if user.target in _EXPERT_VIEWS and user.args[0] is src and _keeps_experts(user):
            flipped ^= _flips(user)
            todo += [(user, u, flipped) for u in user.users]
            continue
        position = _matmul_operand(user, src)
        if position is None:
            return None
        # the weight as a right operand is [in, out] (x @ W); as a left one, or in a linear, [out, in]
        stored_in_out = position == 1 and user.target != aten.linear.default
        layouts.add("in_out" if stored_in_out != flipped else "out_in")
        first = first or user
    return (layouts.pop(), first) if len(layouts) == 1 else None


def _keeps_experts(node: fx.Node) -> bool:
    """Whether a view keeps each expert's matrix whole: it picks along dim 0 or changes nothing else."""
    if node.target == aten.index.Tensor:
        return len(node.args[1]) == 1
    if node.target == aten.select.int:
        return node.args[1] == 0
    if node.target == aten.permute.default:
        return list(node.args[1])[0] in (0, -3)
    if node.target == aten.transpose.int:
        return _flips(node) or node.args[1] == node.args[2]
    return True


def _flips(node: fx.Node) -> bool:
    """Whether a view swaps the last two dims of the matrices it passes on."""
    if node.target == aten.transpose.int:
        ndim = node.args[0].meta["val"].dim()
        return sorted(d % ndim for d in node.args[1:3]) == [ndim - 2, ndim - 1]
    if node.target == aten.permute.default:
        ndim = len(node.args[1])
        return [d % ndim for d in node.args[1]][-2:] == [ndim - 1, ndim - 2]
    return False


def _matmul_operand(node: fx.Node, src: fx.Node) -> int | None:
    """Which operand (0 or 1) of a matmul-like op ``src`` is; None if ``node`` is none."""
    grouped = "grouped_mm" in str(node.target)  # torch's and transformers' grouped matmuls
    if node.target not in _BATCHED and node.target != aten.linear.default and not grouped:
        return None
    args = list(node.args[:2])
    return args.index(src) if src in args and args.count(src) == 1 else None


def find_sites(gm: fx.GraphModule, model: nn.Module, prefix: str = "") -> list[Site]:
    """Every parameter-consuming op, stack of experts and attention op of ``gm``, grouped by weight.

    Arguments:
        prefix: what the graph's module paths carry in front of the model's own
            (``"model."`` when a wrapper around the model was traced).
    """
    owners = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    # The model's own parameters only: adapter state the graph also holds is never a site.
    params = {n: p for n, p in gm.named_parameters(remove_duplicate=False)
              if n.startswith(prefix) and id(p) in owners}
    embed_weight = getattr(input_embeddings_of(model), "weight", None)
    encoder = _encoder_path(model)
    sites: dict[str, Site] = {}
    # Linear-like uses first: a weight read by a linear op is a linear site, whatever else reads it.
    for node in gm.graph.nodes:
        use = linear_use(node)
        if use is None or use.weight.target not in params:
            continue
        weight = params[use.weight.target]
        path, wname = _site_name(node, weight, use.weight.target, model, owners, prefix)
        shape, dtype = read_as(weight)  # a 4-bit packed weight reads as its float matrix
        out_f, in_f = shape if use.layout == "out_in" else shape[::-1]
        bias = node.args[use.bias_index] if use.bias_index is not None else None
        site = sites.setdefault(
            f"{path}.{wname}",
            Site(path, wname, LINEAR, _op_name(node), use.layout, int(in_f), int(out_f),
                 dtype, weight.device, layer_index(path), has_bias=bias is not None,
                 bias_name=_bias_name(bias, path, prefix)),
        )
        site.nodes.append(node.name)
    for node in gm.graph.nodes:  # expert stacks: the weight's reads
        if node.op != "get_attr" or node.target not in params or (found := expert_layout(node)) is None:
            continue
        layout, first = found
        weight = params[node.target]
        path, wname = _site_name(first, weight, node.target, model, owners, prefix)
        experts, a, b = weight.shape
        out_f, in_f = (a, b) if layout == "out_in" else (b, a)
        site = sites.setdefault(
            f"{path}.{wname}",
            Site(path, wname, EXPERTS, _op_name(first), layout, int(in_f), int(out_f), weight.dtype,
                 weight.device, layer_index(path), experts=int(experts)),
        )
        site.nodes.append(node.name)
    for node in gm.graph.nodes:
        if node.op != "call_function" or linear_use(node) is not None:
            continue
        shapes = attention_shapes(node)
        if shapes is not None:
            path = _strip(module_path(node) or "", prefix)
            q, k = shapes
            projections = {}
            if node.target in _SDPA:
                projections = {role: _strip(module_path(n) or "", prefix)
                               for role, n in attention_projections(node).items()}
                if "output" in projections and linear_use(attention_projections(node)["output"]).bias_index is not None:
                    projections["output_bias"] = projections["output"]
            site = Site(path, "", ATTENTION, _op_name(node), dtype=k.dtype, device=k.device,
                        layer=layer_index(path), heads=int(k.shape[1]) if k.dim() == 4 else 0,
                        head_dim=int(k.shape[-1]), cross=not _same_sequence(q.shape[-2], k.shape[-2]),
                        encoder=bool(encoder) and (path + ".").startswith(encoder + "."), projections=projections)
            sites.setdefault(path, site).nodes.append(node.name)
            continue
        if _is_conv(node):
            if _param(node.args[1]) and node.args[1].target in params:
                site = _conv_site(node, params[node.args[1].target], model, owners, prefix)
                sites.setdefault(site.weight_path, site).nodes.append(node.name)
            continue
        for arg in node.args:
            if not (_param(arg) and arg.target in params):
                continue
            weight = params[arg.target]
            path, wname = _site_name(node, weight, arg.target, model, owners, prefix)
            known = sites.get(f"{path}.{wname}")
            if known is not None and known.kind in (LINEAR, EXPERTS):
                continue  # a linear site holds linear ops only (x @ W.T's transpose, W ** 2 elsewhere)
            lookup = node.target == aten.embedding.default and arg is node.args[0]
            rows, width = weight.shape if lookup else (0, 0)
            site = sites.setdefault(
                f"{path}.{wname}",
                Site(path, wname, _op_name(node).split(".")[1], _op_name(node), in_features=int(rows),
                     out_features=int(width), dtype=weight.dtype, device=weight.device, layer=layer_index(path),
                     input_embedding=weight is embed_weight and lookup),
            )
            site.nodes.append(node.name)
    return list(sites.values())


def _is_conv(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.name.removeprefix(
        "aten::") in _CONV_OPS


def _conv_site(node: fx.Node, weight: torch.Tensor, model: nn.Module, owners, prefix: str) -> Site:
    """The site of a convolution op's weight: channels, bias and geometry from its arguments
    (the schema's defaults where the graph leaves them out)."""
    path, wname = _site_name(node, weight, node.args[1].target, model, owners, prefix)
    given = {a.name: node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value)
             for i, a in enumerate(node.target._schema.arguments)}
    dims = weight.dim() - 2

    def per_dim(v) -> tuple[int, ...]:
        v = [v] if isinstance(v, int) else list(v)
        return tuple(int(i) for i in (v * dims if len(v) == 1 else v))

    transposed = "transpose" in node.target._schema.name or bool(given.get("transposed"))
    groups = int(given["groups"])
    padding = given["padding"] if isinstance(given["padding"], str) else per_dim(given["padding"])
    try:
        padding_mode = getattr(model.get_submodule(path), "padding_mode", "zeros") if path else "zeros"
    except AttributeError:
        padding_mode = "zeros"
    conv = Conv(tuple(int(k) for k in weight.shape[2:]), per_dim(given["stride"]), padding,
                per_dim(given["dilation"]), groups, transposed, padding_mode)
    rows, cols = int(weight.shape[0]), int(weight.shape[1]) * groups
    in_f, out_f = (rows, cols) if transposed else (cols, rows)
    bias = given["bias"]
    return Site(path, wname, CONVOLUTION, _op_name(node), in_features=in_f, out_features=out_f,
                dtype=weight.dtype, device=weight.device, layer=layer_index(path), conv=conv,
                has_bias=bias is not None, bias_name=_bias_name(bias, path, prefix))


def attention_shapes(node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The example queries and keys (``[..., length, head_dim]``) of an attention op, or None if
    ``node`` is none: an ``aten.scaled_dot_product_attention``, or an eager attention's softmax
    over the scores ``q @ k^T`` (``matmul``, ``bmm``, ``baddbmm``), reached through scaling,
    soft-capping, masks, biases, casts and views."""
    if node.op != "call_function":
        return None
    if node.target in _SDPA:
        return node.args[0].meta["val"], node.args[1].meta["val"]
    if node.target not in _SOFTMAX:
        return None
    scores = node.args[0]
    while isinstance(scores, fx.Node) and scores.target in _SCORE_OPS:
        operands = [a for a in scores.args if isinstance(a, fx.Node) and _is_tensor(a)
                    and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].is_floating_point()]
        # follow the operand of the scores' own shape (a mask or bias broadcasts into it)
        scores = max(operands, key=lambda a: a.meta["val"].dim(), default=None)
    if not isinstance(scores, fx.Node) or scores.target not in _SCORES:
        return None
    q, kt = scores.args[-2:] if scores.target == aten.baddbmm.default else scores.args[:2]
    if not all(isinstance(a, fx.Node) and not _param(a) and _is_tensor(a) for a in (q, kt)):
        return None
    q, kt = q.meta["val"], kt.meta["val"]
    if q.dim() < 3 or kt.dim() != q.dim():
        return None
    return q, kt.transpose(-1, -2)


def _same_sequence(queries, keys) -> bool:
    """Whether keys of length ``keys`` are the queries' own sequence (self-attention): the
    lengths are equal, or, symbolic, differ by a constant (cached positions in front)."""
    if isinstance(queries, int) and isinstance(keys, int):
        return queries == keys
    diff = keys - queries
    return isinstance(diff, int) or bool(diff.node.expr.is_number)


def _encoder_path(model: nn.Module) -> str | None:
    """The module path of an encoder-decoder model's encoder (None for other models)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return next((name for name, m in model.named_modules() if m is encoder), None)


def attention_projections(node: fx.Node) -> dict[str, fx.Node]:
    """The linear ops around an attention op: ``"key"`` and ``"value"``, the ones whose
    outputs reach its keys and values through other ops only (reshapes, rotary embeddings,
    head repeats), and ``"output"``, the first one its output reaches. A role is left
    out unless exactly one of the model's own linear ops fills it; linear ops that adapters
    inserted are passed over (LoRA's ``lora_A``), not counted.
    """
    found = {"key": _one(_linears(node.args[1], lambda n: n.all_input_nodes)),
             "value": _one(_linears(node.args[2], lambda n: n.all_input_nodes)),
             "output": _one(_linears(node, lambda n: list(n.users)))}
    return {role: n for role, n in found.items() if n is not None}


def _linears(start: fx.Node, step) -> set[fx.Node]:
    """The nearest linear ops from ``start``, following ``step`` along tensor values."""
    found, seen, todo = set(), set(), list(step(start))
    while todo:
        n = todo.pop()
        if n in seen or not _is_tensor(n):
            continue
        seen.add(n)
        if linear_use(n) is not None:
            if "peftc" not in n.meta:  # an adapter's own (builder.META_ADAPTER)
                found.add(n)
            continue
        todo.extend(step(n))
    return found


def _is_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):  # split's outputs
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor) or (val is None and node.op == "call_function" and "peftc" in node.meta)


def _one(nodes: set[fx.Node]) -> fx.Node | None:
    return next(iter(nodes)) if len(nodes) == 1 else None


def _op_name(node: fx.Node) -> str:
    return str(node.target)  # "aten.linear.default"


def _strip(path: str, prefix: str) -> str:
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def module_path(node: fx.Node) -> str | None:
    """The path of the innermost module ``node`` ran in (as the traced graph names it);
    None for a node export recorded no module for."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return None if path.startswith("_empty_nn_module_stack") else path


def _bias_name(bias, path: str, prefix: str) -> str | None:
    if not _param(bias):
        return None
    full = _strip(bias.target, prefix)
    return full[len(path) + 1:] if path and full.startswith(path + ".") else None


def _site_name(node, weight, target, model, owners, prefix="") -> tuple[str, str]:
    """(module path, parameter name) of a weight as the user's model names it.

    The innermost module the op ran in wins when it owns the weight, so a tied
    ``lm_head`` is named ``lm_head`` and not after the embedding it shares with.
    """
    path = _strip(module_path(node) or "", prefix)
    if path:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is not None:
            for name, p in module.named_parameters(recurse=False):
                if p is weight:
                    return path, name
    full = owners.get(id(weight), _strip(target, prefix))
    path, _, name = full.rpartition(".")
    return path, name
