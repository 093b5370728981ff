"""Selectors: predicates over sites, composable with ``|``, ``&`` and ``~``.

Selectors look at ops, not module classes::

    peftc.linear(r".*\\.(q|v)_proj")              every linear-like op in q_proj / v_proj
    peftc.linear(layers=range(4))                 ... in layers 0-3
    peftc.experts(indices=[0, 3])                 experts 0 and 3 of every stack of experts
    peftc.module(r"lm_head")                      any op that reads lm_head's parameters
    peftc.op("aten.addmm")                        by ATen op name
    peftc.attention()                             every scaled_dot_product_attention
    peftc.attention(top=2)                        ... of the last 2 layers
    peftc.input_embeddings()                      the input-embedding lookup
    peftc.linear() & ~peftc.module(r".*lm_head")  combinations
    peftc.linear() & ~peftc.experts()             linear ops, not stacks of experts

A stack of experts (a MoE layer's 3-D weight, :mod:`peftc.sites`) is one site holding
several experts. ``linear()`` and ``module()`` pick it whole; ``experts(indices=...)`` picks
some of its experts, and combinations work per expert: ``|`` unites the experts picked,
``&`` intersects them, ``~`` takes the others (``~experts(indices=[0])`` is every expert but 0,
and every site that isn't a stack of experts).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from torch import fx, nn

from .errors import RuleError
from .sites import EXPERTS, Site, find_sites, layer_index


def discover(gm: fx.GraphModule, model: nn.Module, prefix: str, selectors: Iterable[Selector]) -> list[Site]:
    """Every site of ``gm``: its op sites plus those the selectors find themselves."""
    sites = find_sites(gm, model, prefix)
    known = {s.weight_path for s in sites}
    for selector in selectors:
        for site in selector.extra_sites(gm, model, prefix):
            if site.weight_path not in known:
                known.add(site.weight_path)
                sites.append(site)
    return sites


class Selector:
    """A predicate over :class:`~peftc.sites.Site`. Subclass and define ``__call__``."""

    def __call__(self, site: Site) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def select(self, sites: list[Site]) -> list[Site]:
        """The sites this selector picks out of ``sites`` (every site of a graph). The default
        asks ``self(site)`` of each; a selector that picks among them (the last N layers) overrides it."""
        return [s for s in sites if self(s)]

    def hint(self) -> str | None:
        """A module-path pattern, used to suggest near misses when nothing matches."""
        return None

    def check_sites(self, sites: list[Site]) -> None:
        """Raise :class:`~peftc.errors.RuleError` if something this selector names reaches none of
        ``sites`` (every site of the graph), even when other parts of it match. The default checks nothing."""

    def extra_sites(self, gm: fx.GraphModule, model: nn.Module, prefix: str) -> list[Site]:
        """Sites this selector finds itself (subgraph patterns), beyond the op sites
        every graph has. Called on every graph peftc builds."""
        return []

    def __or__(self, other: Selector) -> Selector:
        return _Combine("|", (self, other))

    def __and__(self, other: Selector) -> Selector:
        return _Combine("&", (self, other))

    def __invert__(self) -> Selector:
        return _Not(self)

    def __repr__(self) -> str:
        return self.describe()


def _parts(site: Site) -> frozenset[int]:
    """What a selector may pick of a site: its experts' indices (a stack of experts), or the
    site whole (``{0}``)."""
    if site.kind != EXPERTS:
        return frozenset({0})
    return frozenset(range(site.experts) if site.expert_ids is None else site.expert_ids)


def _narrowed(site: Site, parts: frozenset[int]) -> Site:
    """``site`` with only ``parts`` of it picked (all of them: the site itself)."""
    whole = dataclasses.replace(site, expert_ids=None)
    return site if parts == _parts(whole) else dataclasses.replace(site, expert_ids=tuple(sorted(parts)))


def _picks(selector: Selector, sites: list[Site]) -> dict[str, frozenset[int]]:
    """``{weight path: parts}`` of the sites ``selector`` picks."""
    return {s.weight_path: _parts(s) for s in selector.select(sites)}


class _Combine(Selector):
    def __init__(self, how: str, parts: tuple[Selector, ...]):
        self.how, self.parts = how, parts

    def __call__(self, site: Site) -> bool:
        fold = any if self.how == "|" else all
        return fold(part(site) for part in self.parts)

    def select(self, sites):
        picked = [_picks(part, sites) for part in self.parts]
        out = []
        for s in sites:
            found = [p[s.weight_path] for p in picked if s.weight_path in p]
            if not found or (self.how == "&" and len(found) < len(picked)):
                continue
            parts = frozenset().union(*found) if self.how == "|" else frozenset.intersection(*found)
            if parts:
                out.append(_narrowed(s, parts))
        return out

    def describe(self) -> str:
        return "(" + f" {self.how} ".join(p.describe() for p in self.parts) + ")"

    def hint(self) -> str | None:
        return next((h for p in self.parts if (h := p.hint())), None)

    def check_sites(self, sites):
        for part in self.parts:
            part.check_sites(sites)

    def extra_sites(self, gm, model, prefix):
        return [s for p in self.parts for s in p.extra_sites(gm, model, prefix)]


class _Not(Selector):
    def __init__(self, inner: Selector):
        self.inner = inner

    def __call__(self, site: Site) -> bool:
        return not self.inner(site)

    def select(self, sites):
        picked = _picks(self.inner, sites)
        rest = [(s, _parts(s) - picked.get(s.weight_path, frozenset())) for s in sites]
        return [_narrowed(s, parts) for s, parts in rest if parts]

    def describe(self) -> str:
        return f"~{self.inner.describe()}"

    def extra_sites(self, gm, model, prefix):
        return self.inner.extra_sites(gm, model, prefix)


class _Where(Selector):
    """Sites whose module path full-matches a regex, in the given layers, of the given kind."""

    def __init__(self, name, pattern, layers, layers_pattern, kinds: tuple[str, ...] | None):
        self.name, self.pattern, self.kinds = name, pattern, kinds
        self.layers = None if layers is None else _as_layers(layers)
        self.layers_pattern = layers_pattern
        check_layers_pattern(layers_pattern)
        try:
            self._regex = None if pattern is None else re.compile(pattern)
        except re.error as e:
            raise RuleError(f"{name}({pattern!r}): not a valid regular expression: {e}") from e

    def __call__(self, site: Site) -> bool:
        if self.kinds is not None and site.kind not in self.kinds:
            return False
        if self._regex is not None and not self._regex.fullmatch(site.path):
            return False
        if self.layers is not None:
            layer = layer_index(site.path, self.layers_pattern)
            if layer is None or layer not in self.layers:
                return False
        return True

    def describe(self) -> str:
        parts = [repr(self.pattern)] if self.pattern is not None else []
        if self.layers is not None:
            parts.append(f"layers={sorted(self.layers)}")
        return f"{self.name}({', '.join(parts)})"

    def hint(self) -> str | None:
        return self.pattern


class _Top(Selector):
    """The sites of the last ``n`` layers among those ``inner`` picks."""

    def __init__(self, inner: Selector, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise RuleError(f"top={n!r} must be a positive number of layers")
        self.inner, self.n = inner, n

    def __call__(self, site: Site) -> bool:
        return self.inner(site)  # a candidate; which candidates are the top ones, select says

    def select(self, sites):
        picked = self.inner.select(sites)
        if any(s.layer is None for s in picked):
            raise RuleError(f"{self.describe()}: {next(s.path for s in picked if s.layer is None)} has no layer "
                            "index in its module path to rank it by")
        layers = sorted({s.layer for s in picked})
        if len(layers) < self.n:
            raise RuleError(f"{self.describe()} asks for {self.n} layers, but the model has {len(layers)} "
                            f"({layers}); ask for at most {len(layers)}")
        return [s for s in picked if s.layer in layers[-self.n:]]

    def describe(self) -> str:
        inner = self.inner.describe()
        if not inner.endswith(")"):
            return f"{inner}[top={self.n}]"
        return f"{inner[:-1]}{'' if inner.endswith('()') else ', '}top={self.n})"

    def hint(self) -> str | None:
        return self.inner.hint()


class _Experts(_Where):
    """Stacks of experts, or (``indices``) some experts of each."""

    def __init__(self, pattern, layers, layers_pattern, indices):
        super().__init__("experts", pattern, layers, layers_pattern, kinds=(EXPERTS,))
        self.indices = None if indices is None else _as_indices(indices)

    def select(self, sites):
        picked = super().select(sites)
        if self.indices is None:
            return picked
        for s in picked:
            if max(self.indices) >= s.experts:
                raise RuleError(f"{self.describe()}: {s.weight_path} holds {s.experts} experts (0 to "
                                f"{s.experts - 1}); pick indices below {s.experts}")
        return [_narrowed(s, frozenset(self.indices)) for s in picked]

    def check_sites(self, sites):
        if not any(s.kind == EXPERTS for s in sites):
            raise RuleError(f"{self.describe()}: the model has no stack of experts (a 3-D weight read by batched or "
                            "grouped matmuls, as in transformers' Mixtral or Qwen3-MoE experts). Select its linear "
                            "ops with peftc.linear() instead; on a MoE model whose experts run a per-expert Python "
                            "loop, load it with experts_implementation='grouped_mm' or 'batched_mm'")

    def describe(self) -> str:
        inner = super().describe()
        if self.indices is None:
            return inner
        return f"{inner[:-1]}{'' if inner.endswith('()') else ', '}indices={sorted(self.indices)})"


def _as_indices(indices) -> frozenset[int]:
    try:
        picked = None if isinstance(indices, (bool, str)) else _as_layers(indices)
    except (TypeError, ValueError):
        picked = None
    if not picked or any(i < 0 for i in picked):
        raise RuleError(f"indices={indices!r}: expected an expert index (an int >= 0) or a non-empty iterable of them")
    return picked


class _Predicate(Selector):
    def __init__(self, fn: Callable[[Site], bool], name: str):
        self.fn, self.name = fn, name

    def __call__(self, site: Site) -> bool:
        return bool(self.fn(site))

    def describe(self) -> str:
        return self.name


def compile_regex(pattern: str, what: str, template: str = "{}") -> re.Pattern:
    """``template`` with ``pattern`` in it, compiled: the regex a selector will match with.

    Raises:
        RuleError: naming ``what`` (the argument) when it is not a valid regular expression.
    """
    if not isinstance(pattern, str):
        raise RuleError(f"{what}={pattern!r} must be a string (a regular expression)")
    try:
        return re.compile(template.replace("{}", pattern))
    except re.error as e:
        raise RuleError(f"{what}={pattern!r} is not a valid regular expression ({e}); fix it, "
                        "or escape a literal name with re.escape") from e


def check_layers_pattern(layers_pattern) -> None:
    """Check ``layers_pattern`` (a name, a list of names, or None) as :func:`~peftc.sites.layer_index` uses it."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
    for p in patterns:
        compile_regex(p, "layers_pattern", r"(?:^|.*?\.){}\.(\d+)\.")


def _as_layers(layers) -> frozenset[int]:
    if isinstance(layers, int):
        return frozenset([layers])
    if isinstance(layers, Iterable):
        return frozenset(int(i) for i in layers)
    raise RuleError(f"layers={layers!r}: expected an int or an iterable of ints")


def linear(pattern: str | None = None, layers=None, layers_pattern=None) -> Selector:
    """Linear-like ops (``linear``, ``addmm``, ``mm``/``matmul`` with a parameter operand), and
    stacks of experts (3-D weights read by batched or grouped matmuls), each expert a linear map.

    Arguments:
        pattern: regex that must match the whole module path; None matches all.
        layers: an int or iterable of layer indices (see :func:`peftc.sites.layer_index`).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) when
            the default rule finds the wrong number.
    """
    return _Where("linear", pattern, layers, layers_pattern, kinds=("linear", EXPERTS))


def experts(pattern: str | None = None, layers=None, layers_pattern=None, indices=None) -> Selector:
    """Stacks of experts: the 3-D weights of mixture-of-experts layers (``experts.gate_up_proj
    [E, ...]``), found by how the graph reads them (batched or grouped matmuls), not by module class.

    Arguments:
        pattern: regex that must match the whole module path (``.*experts``); None matches all.
        layers, layers_pattern: as in :func:`linear`.
        indices: an expert index or an iterable of them: only those experts of each stack
            get adapters (LoRA gives each adapted expert its own pair). None: every expert.

    Raises:
        RuleError: when matched against a model with no stack of experts, or an index
            beyond a stack's experts.
    """
    return _Experts(pattern, layers, layers_pattern, indices)


def attention(pattern: str | None = None, layers=None, layers_pattern=None, top: int | None = None) -> Selector:
    """Attention ops (``aten.scaled_dot_product_attention``) in modules matching ``pattern``.

    Arguments:
        top: only those of the last ``top`` layers (by layer index) among the matches.
    """
    where = _Where("attention", pattern, layers, layers_pattern, kinds=("attention",))
    return where if top is None else _Top(where, top)


def embedding(pattern: str | None = None) -> Selector:
    """Embedding lookups (``aten.embedding``) of modules matching ``pattern``."""
    return _Where("embedding", pattern, None, None, kinds=("embedding",))


def convolution(pattern: str | None = None, layers=None, layers_pattern=None) -> Selector:
    """Convolutions (``aten.conv1d/2d/3d`` and the transposed ones) whose module path full-matches ``pattern``."""
    return _Where("convolution", pattern, layers, layers_pattern, kinds=("convolution",))


def input_embeddings() -> Selector:
    """The lookup of the model's input embeddings (``model.get_input_embeddings()``)."""
    return _Predicate(lambda s: s.input_embedding, "input_embeddings()")


def module(pattern: str | None = None, layers=None, layers_pattern=None) -> Selector:
    """Any op that reads a parameter owned by a module whose path full-matches ``pattern``."""
    return _Where("module", pattern, layers, layers_pattern, kinds=None)


def op(*names: str) -> Selector:
    """Sites whose ATen op name starts with one of ``names`` (``"aten.addmm"``)."""
    return _Predicate(lambda s: s.op.startswith(names), f"op{names!r}")


def where(fn: Callable[[Site], bool], name: str | None = None) -> Selector:
    """A selector from any predicate over :class:`~peftc.sites.Site`."""
    return _Predicate(fn, name or getattr(fn, "__name__", "where"))
