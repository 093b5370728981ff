"""The adapter-kind protocol that every adapter, built in or user-written, implements.

An adapter kind is a small class that says four things about one site:

- ``init_state(site)``: the parameters (and buffers) it adds, as an ``nn.Module``;
- ``emit(b, site)``: the nodes it inserts after the site's op, written with the
  :class:`~peftc.passes.insert.Builder` ``b``;
- ``merge_delta(site, state)``: what it adds to the site's weights when merged
  (return None from a kind that cannot merge);
- ``state_keys(site)``: how its state is named on disk.
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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def on(self, selector: Selector) -> Rule:
        """A rule that puts this adapter on every site ``selector`` picks."""
        from ..rules import Rule

        return Rule(selector, self)

    def unsupported(self, site: Site) -> str | None:
        """Why this adapter can't go on ``site``, or None when it can."""
        return None

    def init_state(self, site: Site) -> nn.Module:
        raise NotImplementedError

    def emit(self, b, site: Site):
        """Insert nodes after the site's op; return the node that replaces its output."""
        raise NotImplementedError

    def merge_delta(self, site: Site, state: nn.Module) -> dict[str, torch.Tensor] | None:
        """``{base parameter name: float32 delta in its layout}``; None if not mergeable."""
        return None

    @property
    def mergeable(self) -> bool:
        """Whether this kind defines :meth:`merge_delta`."""
        return type(self).merge_delta is not Adapter.merge_delta

    def state_keys(self, site: Site) -> dict[str, str]:
        """``{state attribute: on-disk key suffix}``; the default is the attribute name."""
        return {}

    def config(self) -> dict[str, Any]:
        """The spec as plain data: ``{"kind": ..., **arguments}``."""
        raise NotImplementedError


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
