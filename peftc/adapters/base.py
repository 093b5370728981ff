"""The adapter-kind protocol that every adapter, built in or user-written, implements.

An adapter kind is a small class that says four things about one site:

- ``init_state(site)``: the parameters (and buffers) it adds, as an ``nn.Module``;
- ``emit(b, site)``: the nodes it inserts after the site's op (or, with
  ``position = "before"``, in front of it, rewiring the op's inputs), written
  with the :class:`~peftc.passes.builder.Builder` ``b``;
- ``merge_delta(site, state)``: what it adds to the site's weights when merged
  (a kind that doesn't define it cannot merge);
- ``saved_state(site, state, prefix)``: how its state is named on disk.

Two optional hooks serve kinds that work at the model's input boundary
(prompt tuning) or share one state across sites (prefix tuning):
``rewrite_inputs`` and ``init_states``; generation asks such kinds two more
things: ``rewrite_decode_inputs`` (the inputs of later steps, whose KV cache
holds what the first added) and ``generation_tokens``. Two more let the trunk
ask a kind instead of testing its class: ``no_site_hint`` (what to say when a
rule finds no site) and ``combine`` (``add_weighted_adapter``). A kind whose
``changes_base`` is true (LoRA's PiSSA and OLoRA inits) has its initial merge
delta taken out of the base weights when it is added; a kind whose unmerge
needs what merging saw may keep it in its state during ``merge_delta`` (DoRA's
weight norm), since ``unmerge_delta`` follows the matching merge.

A :class:`Rule` (``adapter.on(selector)``) pairs a spec with a selector.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import RuleError
from ..match import Selector, compile_regex

if TYPE_CHECKING:
    from ..sites import Site

_KINDS: dict[str, type[Adapter]] = {}


class Adapter:
    """Base class of adapter specs. A spec is immutable data; its state lives per site."""

    kind: ClassVar[str] = ""
    #: "after": emit nodes after the op and return its new output.
    #: "before": emit nodes before the op and rewire its inputs with ``b.replace_input``.
    position: ClassVar[str] = "after"
    #: Whether peftc may switch the adapter off by selecting the op's original
    #: output (or inputs) with ``aten.where`` on its gate. Kinds that change
    #: shapes (prefix tuning) can't be gated and are switched by retracing.
    gated: ClassVar[bool] = True
    #: The kind applies its gate itself with ``b.gated(...)`` (cheaper than
    #: selecting a whole activation); peftc then adds no ``where`` of its own.
    #: Add a gated value, never multiply by one: ``NaN * 0`` is NaN.
    gates_itself: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            _KINDS[cls.kind] = cls

    def gates_itself_at(self, site: Site) -> bool:
        """Whether the kind applies its gate itself at ``site`` (default: :attr:`gates_itself`);
        LoRA does at a stack of experts, selecting its small factors rather than the whole weight."""
        return self.gates_itself

    def on(self, selector: Selector) -> Rule:
        """A rule that puts this adapter on every site ``selector`` picks."""
        return Rule(selector, self)

    def unsupported(self, site: Site) -> str | None:
        """Why this adapter can't go on ``site``, or None when it can."""
        return None

    def default_selector(self) -> Selector | None:
        """The selector used when the adapter is given as a rule by itself (prompt tuning)."""
        return None

    def init_state(self, site: Site) -> nn.Module:
        raise NotImplementedError

    def no_site_hint(self) -> str | None:
        """What to tell the user when a rule with this adapter finds no site (None: the
        nearest module paths are listed instead)."""
        return None

    def init_states(self, sites: list[Site], model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(state key, state)`` per site; sites may share one state by sharing its key.

        The default gives each site its own :meth:`init_state`, keyed by
        :attr:`Site.key <peftc.sites.Site.key>` (the module path, or the weight
        path when the weight isn't called ``weight``).
        """
        return [(s.key, self.init_state(s)) for s in sites]

    def rewrite_inputs(self, model: nn.Module, state: nn.Module, kwargs: dict) -> dict:
        """Change the model's keyword inputs before its forward; this code is traced too."""
        return kwargs

    def rewrite_decode_inputs(self, model: nn.Module, state: nn.Module, kwargs: dict) -> dict:
        """:meth:`rewrite_inputs` for the steps of generation after the first, whose KV cache
        already holds what the first step added. The default is :meth:`rewrite_inputs`."""
        return self.rewrite_inputs(model, state, kwargs)

    def generation_tokens(self) -> tuple[int, int]:
        """``(cache slots, positions)`` this kind puts in front of a generated sequence:
        virtual tokens that enter the KV cache, and positions the real tokens are shifted by."""
        return 0, 0

    @property
    def rewrites_inputs(self) -> bool:
        return type(self).rewrite_inputs is not Adapter.rewrite_inputs

    def emit(self, b, site: Site):
        """Insert nodes at the site's op; return the node that replaces its output (``b.y``: none)."""
        return b.y

    def merge_delta(self, site: Site, state: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What merging adds to the site's parameters: ``{parameter name: delta}``.

        Arguments:
            weights: the site module's own parameters (``"weight"``, ``"bias"``...),
                widened to float32 (float64 stays), for kinds whose delta depends on them.

        A kind that doesn't define this cannot merge.
        """
        raise NotImplementedError

    def unmerge_delta(self, site: Site, state: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What unmerging subtracts, given the *merged* parameters. The default, the
        merge delta again, is right for additive kinds; a multiplicative kind overrides it."""
        return self.merge_delta(site, state, weights)

    @property
    def changes_base(self) -> bool:
        """Whether adding this adapter subtracts its initial :meth:`unmerge_delta` from the base
        weights, so that base plus adapter is the model as it was (PiSSA, OLoRA: the adapter
        starts as the weight's principal part, the base keeps the residual). peftc does it
        with the merge writer, all or nothing, once the adapter's state is registered."""
        return False

    @property
    def mergeable(self) -> bool:
        """Whether this kind defines :meth:`merge_delta`."""
        return type(self).merge_delta is not Adapter.merge_delta

    def saved_state(self, site: Site, state: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved for this site, by full on-disk key.

        ``prefix`` is the site's PEFT key prefix (``base_model.model.<path>.``);
        the default saves every parameter under it by attribute name.
        """
        return {prefix + name: p for name, p in state.named_parameters()}

    def reserved(self, max_rank: int) -> Adapter:
        """The spec of a reserved slot on this adapter's sites (:class:`peftc.Reserve`): its
        nodes are in the graph from the first compile, and any adapter that fits it
        (:meth:`misfit`) is later written into it without recompiling. A kind whose state has
        no rank to pad can't be reserved (the default)."""
        raise RuleError(f"{type(self).__name__} adapters can't be reserved: peftc.Reserve holds LoRA adapters")

    def misfit(self, site: Site, room: Adapter, state: nn.Module) -> str | None:
        """Why this adapter can't be written into ``state``, the state of spec ``room`` at
        ``site`` (a reserved slot, or the adapter it hot-swaps); None when it can.
        The default: the same kind and configuration, so every state shape is equal."""
        if type(room) is not type(self) or room.config() != self.config():
            return f"{self!r} differs from {room!r}, which the graph was built for"
        return None

    def fill(self, site: Site, room: nn.Module, state: nn.Module) -> None:
        """Write ``state`` (this adapter's own, as :meth:`init_state` made it) into ``room``,
        a state :meth:`misfit` accepted. The default copies every tensor as it is."""
        with torch.no_grad():
            for name, value in (*state.named_parameters(), *state.named_buffers()):
                _tensor(room, name).copy_(value)

    def clear(self, state: nn.Module) -> None:
        """Make ``state`` act as no adapter, in place: an empty reserved slot, or a site a
        hot-swapped adapter leaves out. A kind that defines no such state can't (the default)."""
        raise NotImplementedError

    @property
    def clearable(self) -> bool:
        """Whether this kind defines :meth:`clear`."""
        return type(self).clear is not Adapter.clear

    def config(self) -> dict[str, Any]:
        """The spec as plain data: ``{"kind": ..., **arguments}``."""
        raise NotImplementedError

    def combine(self, sources: list, weights: list[tuple[str, float]], how: str,
                rank: int | None) -> tuple[Adapter, dict[str, dict[str, torch.Tensor]]]:
        """A new adapter combining others of this kind (``add_weighted_adapter``).

        Arguments:
            sources: the placements of the adapters to combine, in the order named.
            weights: ``(adapter name, weight)`` in the order given; a name may repeat.
            how: the combination type; rank: the requested rank, if any.

        Returns:
            ``(spec, {weight path: {state parameter name: value}})``: the new
            adapter's spec, and the values to load into its state at each site.
        """
        raise RuleError(f"add_weighted_adapter can't combine {type(self).__name__} adapters")


@dataclass(frozen=True)
class Rule:
    """Put ``adapter`` on every site that ``selector`` picks."""

    selector: Selector
    adapter: Adapter

    def __post_init__(self):
        if not isinstance(self.selector, Selector):
            raise RuleError(f"Rule selector must be a peftc selector, got {self.selector!r}")
        if not isinstance(self.adapter, Adapter):
            raise RuleError(f"Rule adapter must be a peftc adapter, got {self.adapter!r}")

    def __str__(self):
        return f"{self.adapter!r}.on({self.selector.describe()})"


NO_ATTENTION_HINT = ("the model has no scaled_dot_product_attention op peftc can see. "
                     "For attention, load the model with attn_implementation='sdpa'")


def _tensor(module: nn.Module, dotted: str) -> torch.Tensor:
    path, _, name = dotted.rpartition(".")
    return getattr(module.get_submodule(path), name)


def check_virtual_tokens(n) -> None:
    """Prompt and prefix tuning: a positive number of virtual tokens."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise RuleError(f"num_virtual_tokens={n!r} must be a positive integer")


def lead_with_ones(kwargs: dict, name: str, n: int) -> None:
    """Put ``n`` ones in front of mask ``kwargs[name]`` (``[batch, length]``), if there is one:
    the virtual tokens a prompt or prefix adds are visible to every real one."""
    mask = kwargs.get(name)
    if mask is not None:
        kwargs[name] = torch.cat([mask.new_ones((mask.shape[0], n)), mask], 1)


def check_positions(model: nn.Module, n: int, kind: str) -> None:
    """Prompt and prefix tuning: ``n`` virtual tokens leave room for real ones."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and n >= limit:
        raise RuleError(
            f"{kind}(num_virtual_tokens={n}) leaves no room for real tokens: the model has "
            f"{limit} positions. Use fewer virtual tokens"
        )


PATTERN = r"(.*\.)?({})$"  # how PEFT matches rank_pattern / alpha_pattern keys to a module path


def check_rank_alpha(label: str, r, alpha, rank_pattern: dict, alpha_pattern: dict) -> None:
    """Low-rank kinds (LoRA, LoHa, LoKr): positive integer ranks, finite positive alphas,
    and pattern keys that compile as PEFT will match them.

    Raises:
        RuleError: naming the bad value and what to use instead.
    """
    for value in [r, *rank_pattern.values()]:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RuleError(f"{label} rank r={value!r} must be a positive integer (try r=8)")
    for value in [alpha, *alpha_pattern.values()]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise RuleError(f"{label} alpha={value!r} must be a finite number > 0 (try alpha=2*r)")
    for what, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in patterns:
            compile_regex(key, f"{what} key", PATTERN)


def pattern_value(patterns: dict, site: Site, default):
    """The value of the first key of ``patterns`` matching the site's module path, or the key
    it is saved under (a bare parameter's weight path), as PEFT matches ``rank_pattern`` keys
    (``(.*\.)?(key)$``); else ``default``."""
    for key, value in patterns.items():
        if any(re.match(PATTERN.replace("{}", key), path) for path in (site.path, site.key)):
            return value
    return default


def conv_refusal(site: Site, label: str) -> str | None:
    """Why no PEFT kind adapts this convolution as its own op, or None: PEFT wraps Conv1d/2d/3d,
    not transposed ones, and applies its adapter to the unpadded input with zero padding, which
    differs from a convolution whose module pads by itself (``padding_mode`` other than zeros)."""
    conv, leave_out = site.conv, f"leave {site.path} out of the targets"
    if conv.transposed:
        return f"PEFT 0.21 has no {label} for transposed convolutions ({site.op}); {leave_out}"
    if conv.padding_mode != "zeros":
        return (f"its padding_mode is {conv.padding_mode!r}, but PEFT's {label} pads with zeros, so peftc "
                f"can't give PEFT's numbers there; {leave_out} or use padding_mode='zeros'")
    return None


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype merges compute in: float64 stays, everything else is float32."""
    return t.double() if t.dtype == torch.float64 else t.float()


def adapter_from_config(data: dict[str, Any]) -> Adapter:
    """Build an adapter spec from ``{"kind": "lora", "r": 8, ...}``."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _KINDS:
        raise RuleError(f"unknown adapter kind {kind!r}; known kinds: {sorted(_KINDS)}")
    try:
        return _KINDS[kind](**data)
    except TypeError as e:
        raise RuleError(f"bad arguments for adapter kind {kind!r}: {e}") from e
