"""Subgraph-pattern selectors: pick sites by the shape of a small computation.

A pattern is a small Python function (or ``nn.Module``), traced to the same
ATen IR as the model (``torch.export`` non-strict, then ``ep.module()``), and
matched against the model's graph on use-def structure, never on names::

    def attn_logits(q, k):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)

    def mlp(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    rules = [Temperature().on(peftc.pattern(attn_logits)),
             Houlsby(16).on(peftc.pattern(mlp))]

Every match becomes one :class:`PatternSite`. Its op node (the *anchor*) is
the pattern's output: an ``"after"`` adapter sees it as ``b.y``, a ``"before"``
adapter rewires its inputs. The pattern's arguments are wildcards: each one
matches any graph value (an activation, a parameter, even a ``None`` bias), and
``site.input(b, "w1")`` hands the matched node to ``emit``; a pattern argument
that matched a model parameter is named in ``site.params`` (for merging).
Literals (the ``0.125`` above, dims, einsum equations) are wildcards too unless
``ignore_literals=False``.

Matching uses torch.fx's :class:`~torch.fx.passes.utils.matcher_utils.SubgraphMatcher`,
not networkx isomorphism: it starts from the graph nodes with the pattern
output's op and walks use-def edges backwards, compares ATen overloads and
argument positions (normalising keyword/positional forms by the op schema),
treats placeholders as wildcards, and rejects matches whose inner values leak
out of the matched subgraph. networkx would need every node's target,
argument position and literal encoded as labels by hand, and knows nothing of
op schemas or leaking values.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from .errors import RuleError, first_line
from .match import Selector
from .passes.builder import META_ADAPTER, STATE_ROOT
from .quiet import quiet
from .sites import Site, layer_index, module_path

aten = torch.ops.aten

PATTERN = "pattern"  # Site.kind of every pattern site

# Nodes export adds to any graph that say nothing about the computation.
_NOISE = {
    aten._assert_tensor_metadata.default,
    aten.sym_size.int,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
}


@dataclass
class PatternSite(Site):
    """A :class:`~peftc.sites.Site` found by a pattern: one match in one graph.

    Beyond a site's fields (``path``: the innermost module holding every
    matched op and parameter; ``op``: the anchor's ATen op; ``nodes``: the
    anchor's name; ``dtype``/``device``: the anchor output's; ``in_features``:
    the first argument's last dim; ``out_features``: the anchor output's last
    dim, 0 when symbolic), it records:

    Attributes:
        pattern: the pattern's name (``weight_name`` is ``<pattern>_<i>``).
        inputs: pattern argument -> matched graph node name (or the literal it matched).
        params: pattern argument (or the pattern's own parameter name) -> the
            model parameter it matched, relative to ``path`` (what ``merge_delta`` returns keys in).
        shapes: pattern argument -> shape of the matched value (None for a symbolic dim).
        matched: pattern node name -> graph node name, for every matched op.
    """

    pattern: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)

    def input(self, b, name: str):
        """The graph node (in ``b``'s graph) that pattern argument ``name`` matched."""
        if name not in self.inputs:
            raise KeyError(f"pattern {self.pattern!r} has no argument {name!r}; it has {sorted(self.inputs)}")
        return _lookup(b.node.graph, self.inputs[name])

    def matched_node(self, b, name: str) -> fx.Node:
        """The graph node (in ``b``'s graph) that the pattern's node ``name`` matched."""
        if name not in self.matched:
            raise KeyError(f"pattern {self.pattern!r} has no node {name!r}; it has {sorted(self.matched)}")
        return _lookup(b.node.graph, self.matched[name])

    def __str__(self) -> str:
        return f"{self.path or '<root>'} [pattern {self.pattern} at {self.op}]"


def _lookup(graph: fx.Graph, name):
    if not isinstance(name, _NodeName):
        return name  # the argument matched a literal
    for node in graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node {name!r} in this graph")


class _NodeName(str):
    """A graph node's name, told apart from a string literal an argument matched."""


def pattern(fn, example_inputs=None, *, name: str | None = None, ignore_literals: bool = True) -> Selector:
    """A selector that picks every place in the graph computing what ``fn`` computes.

    Arguments:
        fn: a function of tensors (or an ``nn.Module``). Its arguments are
            wildcards; its return value (one tensor) is the site's op.
        example_inputs: a tuple of tensors to trace ``fn`` with. By default
            peftc tries a few small shapes (all 4-D, then a 3-D first argument
            with 2-D others, then all 2-D), every dim 4.
        name: names the sites (``<name>_<i>``) and the rule in messages; by
            default ``fn.__name__``. Two patterns in one compile need different names.
        ignore_literals: treat constants (scales, dims, einsum equations) as
            wildcards. Set False to match them exactly.

    Raises:
        RuleError: ``fn`` can't be traced, or traces to nothing to match.
    """
    return PatternSelector(fn, example_inputs, name=name, ignore_literals=ignore_literals)


class PatternSelector(Selector):
    """Selects the :class:`PatternSite`\\ s that its pattern's matches produce."""

    def __init__(self, fn, example_inputs=None, *, name=None, ignore_literals=True):
        self.fn = fn
        self.name = _clean_name(name if name is not None else _default_name(fn))
        self.ignore_literals = ignore_literals
        self.gm, self.arg_names = _trace_pattern(fn, example_inputs, self.name)
        self.ops = [n.target for n in self.gm.graph.nodes if n.op == "call_function"]
        self._miss: str | None = None

    # -- Selector protocol --------------------------------------------------------

    def __call__(self, site: Site) -> bool:
        return site.kind == PATTERN and getattr(site, "pattern", None) == self.name

    def describe(self) -> str:
        out = f"pattern({self.name})"
        return f"{out} [{self._miss}]" if self._miss else out

    def explain_miss(self) -> str | None:
        """Why the last graph searched had no match (None when it had one)."""
        return self._miss

    def extra_sites(self, gm: fx.GraphModule, model: nn.Module, prefix: str) -> list[Site]:
        matches = self.find(gm)
        self._miss = None if matches else self._why_no_match(gm)
        sites: list[Site] = []
        per_path: dict[str, int] = {}
        for m in matches:
            site = self._site(m, gm, prefix)
            if site is None:
                continue
            i = per_path.get(site.path, 0)
            per_path[site.path] = i + 1
            site.weight_name = f"{self.name}_{i}"
            sites.append(site)
        return sites

    # -- matching ---------------------------------------------------------------

    def find(self, gm: fx.GraphModule) -> list:
        """The matcher's matches in ``gm`` that touch no adapter node, in graph order."""
        # Overlaps are removed here, after dropping matches on adapter nodes, so that
        # such a match never hides one on the model's own nodes.
        matcher = SubgraphMatcher(self.gm.graph, match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=False, ignore_literals=self.ignore_literals)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        out, taken = [], set()
        for m in sorted(matcher.match(gm.graph), key=lambda m: order[self._anchor(m)]):
            inner = {g for p, g in m.nodes_map.items() if p.op not in ("placeholder", "output")}
            if any(META_ADAPTER in g.meta for g in inner) or inner & taken:
                continue
            taken |= inner
            out.append(m)
        return out

    def _anchor(self, m) -> fx.Node:
        return m.nodes_map[self._output]

    @property
    def _output(self) -> fx.Node:
        return _returned(self.gm.graph)[0]

    def _site(self, m, gm: fx.GraphModule, prefix: str) -> PatternSite | None:
        anchor = self._anchor(m)
        inputs: dict[str, Any] = {}
        shapes: dict[str, tuple] = {}
        params: dict[str, str] = {}  # full (prefix-stripped) parameter paths for now
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for pn, arg_name in zip(placeholders, self.arg_names, strict=True):
            g = m.nodes_map.get(pn)
            inputs[arg_name] = _NodeName(g.name) if isinstance(g, fx.Node) else g
            if isinstance(g, fx.Node):
                shapes[arg_name] = _shape(g)
                if g.op == "get_attr" and _is_parameter(gm, g.target):
                    params[arg_name] = g.target
        matched = {}
        owners = []
        for pn, g in m.nodes_map.items():
            if pn.op == "get_attr" and _is_parameter(gm, g.target):
                params[pn.target.removeprefix("fn.")] = g.target
            elif pn.op == "call_function":
                matched[pn.name] = g.name
                path = module_path(g)
                if path is not None:
                    owners.append(path)
        for target in params.values():
            owners.append(target.rpartition(".")[0])
        if prefix:
            if any(not (o + ".").startswith(prefix) for o in owners):
                return None  # the match reaches outside the model (an input boundary)
            owners = [o[len(prefix):] for o in owners]
            params = {k: v[len(prefix):] if v.startswith(prefix) else v for k, v in params.items()}
        path = _common_module(owners)
        if any(v.startswith(STATE_ROOT + ".") for v in params.values()):
            return None
        rel = {k: v[len(path) + 1:] if path else v for k, v in params.items()}
        val = anchor.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        device = val.device if isinstance(val, torch.Tensor) else torch.device("cpu")
        first = shapes.get(self.arg_names[0]) if self.arg_names else None
        return PatternSite(
            path=path, weight_name="", kind=PATTERN, op=str(anchor.target),
            in_features=_last(first), out_features=_last(_shape(anchor)),
            dtype=dtype, device=device, layer=layer_index(path), nodes=[anchor.name],
            pattern=self.name, inputs=inputs, params=rel, shapes=shapes, matched=matched,
        )

    def _why_no_match(self, gm: fx.GraphModule) -> str:
        present = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        missing = sorted({str(t) for t in self.ops if t not in present})
        if missing:
            return f"the model's graph has no {', '.join(missing)} op"
        return ("every op of the pattern occurs in the graph, but never wired as in the pattern: "
                "check argument order, ops in between (casts, views, contiguous), and that the "
                "pattern's inner values aren't also used outside it")


# -- tracing the pattern ------------------------------------------------------------


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _default_name(fn) -> str:
    if isinstance(fn, nn.Module):
        return type(fn).__name__.lower()
    return getattr(fn, "__name__", None) or type(fn).__name__


def _clean_name(name: str) -> str:
    cleaned = re.sub(r"\W+", "_", str(name)).strip("_")
    return cleaned or "pattern"


def _arg_names(fn) -> list[str]:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def _candidate_inputs(n: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    if n == 0:
        return [()]
    return [
        tuple(t(2, 2, 4, 4) for _ in range(n)),
        (t(2, 4, 4), *(t(4, 4) for _ in range(n - 1))),
        tuple(t(4, 4) for _ in range(n)),
        (t(2, 4, 4), *(t(4, 4) if i % 2 == 0 else t(4) for i in range(n - 1))),
    ]


def _trace_pattern(fn, example_inputs, name: str) -> tuple[fx.GraphModule, list[str]]:
    if not callable(fn):
        raise RuleError(f"peftc.pattern({fn!r}): expected a function or nn.Module to trace")
    names = _arg_names(fn)
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        candidates = [tuple(example_inputs)]
    else:
        candidates = _candidate_inputs(len(names))
    errors = []
    for args in candidates:
        try:
            with quiet(_NOISY_LOGGERS, level=logging.CRITICAL, warnings=False):
                ep = torch.export.export(_Wrap(fn), args, strict=False)
            break
        except Exception as e:  # any failure: try the next shapes, then report
            errors.append((args, e))
    else:
        args, e = errors[0]
        shapes = "; ".join(", ".join(str(list(a.shape)) for a in args) for args, _ in errors)
        hint = ("pass example_inputs=(...) with tensors of shapes that fit it"
                if example_inputs is None else "check that example_inputs fit it")
        raise RuleError(
            f"peftc.pattern: the pattern function {name!r} could not be traced "
            f"({type(e).__name__}: {first_line(e)}) "
            f"with inputs of shapes [{shapes}]; {hint}. The pattern must be straight-line tensor "
            "code (no branches on values)"
        ) from e
    gm = ep.module()
    _clean(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(names) != len(placeholders):
        names = [f"arg{i}" for i in range(len(placeholders))]
    # drop arguments the pattern never reads (the matcher refuses dead code)
    kept = []
    for node, arg in zip(placeholders, names, strict=True):
        if node.users:
            kept.append(arg)
        else:
            gm.graph.erase_node(node)
    gm.recompile()
    if not any(n.op == "call_function" for n in gm.graph.nodes):
        raise RuleError(f"peftc.pattern: the pattern function {name!r} computes nothing (it traces to "
                        "no ATen op); a pattern needs at least one op to match")
    returned = _returned(gm.graph)
    if len(returned) != 1 or returned[0].op != "call_function":
        raise RuleError(f"peftc.pattern: the pattern function {name!r} must return exactly one "
                        f"tensor computed by an op (its site's op), got {len(returned)} outputs")
    return gm, kept


# Silenced while a trying shape fails (the failure is reported, or moot).
_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes",
                  "torch._export.non_strict_utils", "torch.export._trace")


def _clean(gm: fx.GraphModule) -> None:
    """Drop what export adds (guard calls, shape asserts, dead nodes) so only the computation is left."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" or (node.op == "call_function" and node.target in _NOISE and not node.users):
            graph.erase_node(node)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_function", "get_attr") and not node.users:
                graph.erase_node(node)
                changed = True
    gm.recompile()


def _returned(graph: fx.Graph) -> list[fx.Node]:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return out.all_input_nodes


# -- node facts ---------------------------------------------------------------------


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def _common_module(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else None for d in val.shape)


def _last(shape) -> int:
    return shape[-1] if shape and isinstance(shape[-1], int) else 0
