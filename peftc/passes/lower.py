"""Lower an adapted graph module to something callable: ``torch.compile`` or itself."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx


def lower(gm: fx.GraphModule, backend: str | Callable | None, dynamic: bool | None = True) -> Callable:
    """``torch.compile(gm, backend=backend, fullgraph=True, dynamic=dynamic)``; ``"eager"`` or None
    runs ``gm`` as is. ``dynamic=None`` is torch.compile's own strategy: specialise on the first
    shapes, compile again with dynamic shapes when others arrive.

    ``fullgraph=True`` holds because the adapted forward has no Python branches
    on adapter state: the graph is straight-line ATen.
    """
    if backend is None or backend == "eager":
        return gm
    return torch.compile(gm, backend=backend, fullgraph=True, dynamic=dynamic)
