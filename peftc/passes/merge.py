"""The weight side of merging: fold adapter deltas into the model's weights, and take them out.

:func:`fold` checks every delta first, then creates the biases merging needs
(BitFit on a bias-less linear), adds the deltas, and copies trained
``modules_to_save`` values over the originals; it returns a :class:`Folded`
record, the one fact of what was merged and how to undo it. :func:`unfold`
and :func:`refold` take it out and put it back (``disable_adapter`` while merged).

Deltas are computed and applied in float32 (float64 stays float64), whatever the
weights' dtype, then rounded once. The graph side of merging is
:func:`~peftc.passes.insert.strip_adapters` and :mod:`peftc.passes.bias`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.base import widen
from ..errors import MergeError

if TYPE_CHECKING:
    from ..state import Placement


@dataclass
class Folded:
    """What :func:`fold` merged, and what undoing it needs.

    Attributes:
        names: the merged adapters.
        placements: their placements, whose deltas are in the weights.
        copies: the merged ``modules_to_save`` copies, by module path.
        stash: the original values of the parameters the copies overwrote.
        created_biases: biases created on bias-less linears (removed on unmerge).
    """

    names: list[str]
    placements: list[Placement]
    copies: dict[str, nn.Module]
    stash: dict[str, torch.Tensor]
    created_biases: list[str]


def fold(model: nn.Module, placements: list[Placement], saved: dict[str, dict[str, nn.Module]],
         safe: bool = False, progress: bool | None = None) -> Folded:
    """Merge ``placements`` and the ``saved`` copies (adapter name -> path -> copy) into ``model``.

    Raises:
        MergeError: a kind that can't merge, two adapters with a copy of one module, a
            delta that doesn't fit, or (``safe``) non-finite values. Nothing is changed then.
    """
    mergeable_or_raise(placements)
    copies: dict[str, nn.Module] = {}
    for paths in saved.values():
        for path, clone in paths.items():
            if path in copies:
                raise MergeError(f"active adapters both train a copy of {path}; merge one at a time")
            copies[path] = clone
    missing = missing_biases(model, placements, safe)
    if safe:
        for path, clone in copies.items():
            _check_module_finite(path, clone)
    created = create_biases(model, missing)
    apply_deltas(model, placements, +1, progress)
    return Folded(list(saved), list(placements), copies, _copy_in(model, copies), created)


def unfold(model: nn.Module, folded: Folded, progress: bool | None = None) -> None:
    """Subtract the merged deltas and restore the stashed originals: the weights only
    (created biases stay; :func:`remove_biases` takes them away)."""
    apply_deltas(model, folded.placements, -1, progress)
    with torch.no_grad():
        for path, value in folded.stash.items():
            model.get_parameter(path).copy_(value)
    folded.stash.clear()


def refold(model: nn.Module, folded: Folded) -> None:
    """Re-apply what :func:`unfold` took out (same adapters, same biases)."""
    apply_deltas(model, folded.placements, +1, False)
    folded.stash.update(_copy_in(model, folded.copies))


@torch.no_grad()
def _copy_in(model: nn.Module, copies: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Copy each trained copy over its original; return the originals' values."""
    stash = {}
    for path, clone in copies.items():
        for pname, p in clone.named_parameters():
            original = model.get_parameter(f"{path}.{pname}")
            stash[f"{path}.{pname}"] = original.detach().clone()
            original.copy_(p)
    return stash


def _check_module_finite(path: str, module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise MergeError(f"modules_to_save copy {path}.{name} holds NaN/inf; no weight was changed")


class _Widened(Mapping):
    """A module's own parameters, widened to float32 only when an adapter reads one."""

    def __init__(self, module: nn.Module):
        self._params = dict(module.named_parameters(recurse=False))

    def __getitem__(self, name: str) -> torch.Tensor:
        return widen(self._params[name].detach())

    def __iter__(self):
        return iter(self._params)

    def __len__(self):
        return len(self._params)


def _deltas(model: nn.Module, p: Placement, sign: int = 1):
    weights = _Widened(model.get_submodule(p.site.path))
    fn = p.adapter.merge_delta if sign > 0 else p.adapter.unmerge_delta
    for name, delta in fn(p.site, p.state, weights).items():
        path = f"{p.site.path}.{name}" if p.site.path else name
        yield path, _target_param(model, p, path, delta), delta


def _target_param(model: nn.Module, p: Placement, path: str, delta: torch.Tensor) -> nn.Parameter | None:
    """The parameter a delta goes into; None for a bias the op doesn't have yet."""
    module_path, _, name = path.rpartition(".")
    if getattr(model.get_submodule(module_path), name, None) is None and name == p.site.bias_name_or_default:
        return None
    try:
        param = model.get_parameter(path)
    except AttributeError as e:
        raise MergeError(f"{p}: the model has no parameter {path} to merge into") from e
    if param.shape != delta.shape:
        raise MergeError(f"{p}: delta shape {tuple(delta.shape)} doesn't fit {path} {tuple(param.shape)}")
    return param


def missing_biases(model: nn.Module, placements: list[Placement], safe: bool = False) -> list[tuple[Placement, str]]:
    """Check a merge before it changes anything; return the biases it must create.

    Computes each placement's deltas once: every target must exist with the
    delta's shape, or be a bias an ``aten.linear`` can take; with ``safe``, no
    merged value may be NaN or infinite.

    Returns:
        ``(placement, bias path)`` for deltas aimed at a bias the op doesn't have yet.

    Raises:
        MergeError: a target that can't take its delta, or (``safe``) a non-finite result.
    """
    out = []
    for p in placements:
        for path, param, delta in _deltas(model, p):
            if param is None:
                if p.site.op != "aten.linear.default":
                    raise MergeError(
                        f"{p}: {p.site.op} has no bias operand, so a bias delta can't fold into it; "
                        "nothing was merged. Put BitFit on linear or addmm ops only to merge it"
                    )
                out.append((p, path))
            if safe:
                _check_finite(p, path, param, delta)
    return out


def _check_finite(p: Placement, path: str, param: torch.Tensor | None, delta: torch.Tensor) -> None:
    current = delta.new_zeros(delta.shape) if param is None else param
    new = (widen(current) + delta.to(current.device)).to(current.dtype)
    if not torch.isfinite(delta).all() or not torch.isfinite(new).all():
        raise MergeError(
            f"merging adapter {p.adapter_name!r} into {path} would write non-finite values "
            f"(NaN/inf in the adapter, or overflow of {current.dtype}); no weight was changed. "
            "Check the adapter's training, or merge into a wider dtype"
        )


@torch.no_grad()
def create_biases(model: nn.Module, missing: list[tuple[Placement, str]]) -> list[str]:
    """Register a zero bias for each missing one; return their paths (for :func:`remove_biases`)."""
    created = []
    for p, path in missing:
        module_path, _, name = path.rpartition(".")
        module = model.get_submodule(module_path)
        weight = model.get_parameter(p.site.weight_path)
        module.register_parameter(name, nn.Parameter(weight.new_zeros(p.site.out_features), requires_grad=False))
        created.append(path)
    return created


def remove_biases(model: nn.Module, created: list[str]) -> None:
    """Undo :func:`create_biases`: the modules hold ``None`` biases again."""
    for path in created:
        module_path, _, name = path.rpartition(".")
        model.get_submodule(module_path).register_parameter(name, None)


@torch.no_grad()
def apply_deltas(model: nn.Module, placements: list[Placement], sign: int, progress: bool | None) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) every placement's delta in place."""
    desc = "merging" if sign > 0 else "unmerging"
    ordered = placements if sign > 0 else placements[::-1]  # undo stacked kinds last-first
    bar = tqdm(ordered, desc=desc, unit="site", disable=_quiet(progress, len(placements)))
    for p in bar:
        for path, param, delta in _deltas(model, p, sign):
            if param is None:
                raise MergeError(f"{p}: no parameter {path} to merge into; create_biases first")
            param.copy_((widen(param) + sign * delta.to(param.device)).to(param.dtype))


def mergeable_or_raise(placements: list[Placement]) -> None:
    bad = sorted({f"{p.adapter_name} ({p.adapter!r})" for p in placements if not p.adapter.mergeable})
    if bad:
        raise MergeError(
            f"adapters {bad} can't be folded into weights (they add tokens or activations, not weight "
            "deltas); nothing was merged. Delete or disable them first, or export the graph with them baked in"
        )


def _quiet(progress: bool | None, n: int) -> bool:
    return not progress if progress is not None else n < 64
