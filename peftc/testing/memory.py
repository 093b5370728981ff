"""What backward holds on to: a measure for activation checkpointing, comparable across PEFT and peftc."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def held_bytes(model: nn.Module, run: Callable[[], object], layers: Iterable[nn.Module] = ()) -> int:
    """Bytes of the tensors that backward keeps after ``run()`` (a forward of ``model``), parameters
    and buffers not counted (they are resident anyway).

    Counted once per storage: the tensors saved for backward (as
    ``torch.autograd.graph.saved_tensors_hooks`` sees them) and, for modules run
    under ``torch.utils.checkpoint`` in eager code (transformers' checkpointed
    ``layers``), their keyword tensor inputs, which checkpoint keeps without the
    hooks seeing them. peftc's checkpointed regions take every input positionally,
    so for a :class:`~peftc.CompiledModel` leave ``layers`` empty.
    """
    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    held: dict[int, int] = {}

    def hold(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in resident:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def hold_inputs(module, args, kwargs):
        torch.utils._pytree.tree_map(hold, kwargs)

    handles = [layer.register_forward_pre_hook(hold_inputs, with_kwargs=True) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(hold, lambda t: t):
            run()
    finally:
        for h in handles:
            h.remove()
    return sum(held.values())
