"""The adapter-kind protocol that every adapter, built in or user-written, implements.

An adapter kind is a small class that says four things about one site:

- ``init_state(site)``: the parameters (and buffers) it adds, as an ``nn.Module``;
- ``emit(b, site)``: the nodes it inserts after the site's op (or, with
  ``position = "before"``, in front of it, rewiring the op's inputs), written
  with the :class:`~peftc.passes.insert.Builder` ``b``;
- ``merge_delta(site, state)``: what it adds to the site's weights when merged
  (a kind that doesn't define it cannot merge);
- ``saved_state(site, state, prefix)``: how its state is named on disk.

Two optional hooks serve kinds that work at the model's input boundary
(prompt tuning) or share one state across sites (prefix tuning):
``rewrite_inputs`` and ``init_states``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import RuleError

if TYPE_CHECKING:
    from ..match import Selector
    from ..rules import Rule
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
    gates_itself: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            _KINDS[cls.kind] = cls

    def on(self, selector: Selector) -> Rule:
        """A rule that puts this adapter on every site ``selector`` picks."""
        from ..rules import Rule

        return Rule(selector, self)

    def unsupported(self, site: Site) -> str | None:
        """Why this adapter can't go on ``site``, or None when it can."""
        return None

    def default_selector(self) -> Selector | None:
        """The selector used when the adapter is given as a rule by itself (prompt tuning)."""
        return None

    def init_state(self, site: Site) -> nn.Module:
        raise NotImplementedError

    def init_states(self, sites: list[Site], model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(state key, state)`` per site; sites may share one state by sharing its key.

        The default gives each site its own :meth:`init_state`, keyed by its weight path.
        """
        return [(s.key, self.init_state(s)) for s in sites]

    def rewrite_inputs(self, model: nn.Module, state: nn.Module, kwargs: dict) -> dict:
        """Change the model's keyword inputs before its forward; this code is traced too."""
        return kwargs

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
    def mergeable(self) -> bool:
        """Whether this kind defines :meth:`merge_delta`."""
        return type(self).merge_delta is not Adapter.merge_delta

    def saved_state(self, site: Site, state: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved for this site, by full on-disk key.

        ``prefix`` is the site's PEFT key prefix (``base_model.model.<path>.``);
        the default saves every parameter under it by attribute name.
        """
        return {prefix + name: p for name, p in state.named_parameters()}

    def config(self) -> dict[str, Any]:
        """The spec as plain data: ``{"kind": ..., **arguments}``."""
        raise NotImplementedError


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
