"""The weight side of merging: fold adapter deltas into the model's weights, and take them out.

:func:`fold` checks every delta first, then creates the biases merging needs
(BitFit on a bias-less linear), adds the deltas, and copies trained
``modules_to_save`` values over the originals; it returns a :class:`Folded`
record, the one fact of what was merged and how to undo it. :func:`unfold`
and :func:`refold` take it out and put it back (``disable_adapter`` while merged).
:func:`residual_start` takes a new adapter's initial delta out of the weights
(PiSSA, OLoRA), as unmerging would.

All three writers (:func:`fold`, :func:`unfold`, :func:`refold`) are all-or-nothing: every delta is computed and checked
before anything is written, and if anything raises while writing (a kind's
``merge_delta``, running out of memory, ``KeyboardInterrupt``), every
parameter already written gets its old value back, bit for bit, and every bias
created is removed before the exception goes on. Undoing needs a copy of each
parameter before its first write, so a merge holds, at its peak, one extra copy
of the weights it changes.

Deltas are computed and applied in float32 (float64 stays float64), whatever the
weights' dtype, then rounded once. How a weight is read and written is up to its
storage (:mod:`peftc.storage`), never the adapter kind: a 4-bit packed weight is
dequantized, the deltas added, and the sum quantized again with its own
settings (as PEFT merges into 4-bit layers), written into the same tensors.
Requantizing can't be undone exactly, so the packed bytes from before the merge
are kept (4 bits a weight) and unmerging puts them back, bit for bit. The graph side of merging is
:func:`~peftc.passes.insert.strip_adapters` and :mod:`peftc.passes.bias`.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.base import widen
from ..errors import MergeError
from ..quiet import hide_progress
from ..storage import encoded, is_packed, parts, read_as, value

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
        packed: the parts of the 4-bit packed weights merged into, as they were before
            (``(part, value)`` pairs); unmerging copies them back instead of subtracting.
    """

    names: list[str]
    placements: list[Placement]
    copies: dict[str, nn.Module]
    stash: dict[str, torch.Tensor]
    created_biases: list[str]
    packed: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


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
    _check_copies(model, copies, safe)
    with _all_or_nothing(model) as writes:
        _create_biases(model, missing, writes)
        _write_deltas(model, placements, +1, progress, writes)
        stash = _copy_in(model, copies, writes)
    return Folded(list(saved), list(placements), copies, stash, [path for path, _ in writes.created],
                  writes.packed_originals())


def unfold(model: nn.Module, folded: Folded, progress: bool | None = None) -> None:
    """Subtract the merged deltas and restore the stashed originals: the weights only
    (created biases stay; :func:`remove_biases` takes them away).

    Raises:
        MergeError: a delta that doesn't fit (checked before anything is written), or
            whatever an adapter's ``unmerge_delta`` raises. The weights are still merged then.
    """
    _check_deltas(model, folded.placements, -1)
    with _all_or_nothing(model) as writes:
        _write_deltas(model, folded.placements, -1, progress, writes)  # packed weights: skipped
        for path, original in folded.stash.items():
            writes.write(model.get_parameter(path), original)
        for part, original in folded.packed:
            writes.copy(("packed", id(part)), part, original)
    folded.stash.clear()
    folded.packed.clear()


def refold(model: nn.Module, folded: Folded) -> None:
    """Re-apply what :func:`unfold` took out (same adapters, same biases); on failure the
    weights stay unmerged."""
    _check_deltas(model, folded.placements, +1)
    _check_copies(model, folded.copies)
    with _all_or_nothing(model) as writes:
        _write_deltas(model, folded.placements, +1, False, writes)
        stash = _copy_in(model, folded.copies, writes)
    folded.stash.update(stash)
    folded.packed.extend(writes.packed_originals())


@contextmanager
def residual_start(model: nn.Module, placements: list[Placement]):
    """Subtract the initial delta of each placement whose kind ``changes_base`` (PiSSA, OLoRA)
    from its weights; if the block raises, every weight gets its old value back, bit for bit."""
    changing = [p for p in placements if p.adapter.changes_base]
    with _all_or_nothing(model) as writes:
        _write_deltas(model, changing, -1, False, writes)
        yield


class _Writes:
    """The in-place changes of one merge step, kept so that a failure part-way can undo them.

    Each stored tensor is copied before its first write; created biases are listed
    (with whether the module had the attribute before) so :meth:`rollback` removes them.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.originals: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.packed: list[tuple] = []  # keys of the originals that are parts of packed weights
        self.created: list[tuple[str, bool]] = []

    def write(self, param: torch.Tensor, new: torch.Tensor) -> None:
        """Store the float value ``new`` in ``param``, as its storage does (rounded, or quantized again)."""
        for (role, part), fresh in zip(parts(param).items(), encoded(param, new).values(), strict=True):
            key = (role, id(param))
            if is_packed(param) and key not in self.originals:
                self.packed.append(key)
            self.copy(key, part, fresh)

    @torch.no_grad()
    def copy(self, key: tuple, part: torch.Tensor, new: torch.Tensor) -> None:
        """Copy ``new`` into the stored tensor ``part`` (known by ``key``), keeping its first value."""
        if key not in self.originals:
            self.originals[key] = (part, part.clone())
        part.copy_(new)

    def packed_originals(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(part, value before)`` of every packed-weight part written."""
        return [self.originals[key] for key in self.packed]

    @torch.no_grad()
    def rollback(self) -> None:
        for part, original in reversed(self.originals.values()):
            part.copy_(original)
        for path, existed in reversed(self.created):
            module_path, _, name = path.rpartition(".")
            module = self.model.get_submodule(module_path)
            if existed:
                module.register_parameter(name, None)
            else:
                delattr(module, name)
        self.originals.clear()
        self.created.clear()


@contextmanager
def _all_or_nothing(model: nn.Module):
    """Writes made through the yielded :class:`_Writes`, undone if anything raises inside."""
    writes = _Writes(model)
    try:
        yield writes
    except BaseException:
        writes.rollback()
        raise


def _check_copies(model: nn.Module, copies: dict[str, nn.Module], safe: bool = False) -> None:
    for path, clone in copies.items():
        for pname, p in clone.named_parameters():
            try:
                original = model.get_parameter(f"{path}.{pname}")
            except AttributeError as e:
                raise MergeError(f"modules_to_save copy {path}.{pname} has no original in the model; "
                                 "no weight was changed") from e
            if original.shape != p.shape:
                raise MergeError(f"modules_to_save copy {path}.{pname} has shape {tuple(p.shape)}, the "
                                 f"model's {tuple(original.shape)}; no weight was changed")
        if safe:
            _check_module_finite(path, clone)


def _copy_in(model: nn.Module, copies: dict[str, nn.Module], writes: _Writes) -> dict[str, torch.Tensor]:
    """Copy each trained copy over its original; return the originals' values."""
    stash = {}
    for path, clone in copies.items():
        for pname, p in clone.named_parameters():
            original = model.get_parameter(f"{path}.{pname}")
            stash[f"{path}.{pname}"] = original.detach().clone()
            writes.write(original, p.detach())
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
        return widen(value(self._params[name]))

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
    shape, _ = read_as(param)
    if shape != delta.shape:
        raise MergeError(f"{p}: delta shape {tuple(delta.shape)} doesn't fit {path} {tuple(shape)}")
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
    return _check_deltas(model, placements, +1, safe, create=True)


def _check_deltas(model: nn.Module, placements: list[Placement], sign: int, safe: bool = False,
                  create: bool = False) -> list[tuple[Placement, str]]:
    """Compute every delta (``sign=-1``: every unmerge delta) and check it fits, writing nothing;
    with ``create``, a missing bias of an ``aten.linear`` is allowed and returned."""
    out = []
    for p in placements:
        for path, param, delta in _deltas(model, p, sign):
            if param is None:
                if not create:
                    raise MergeError(f"{p}: no parameter {path} to {'merge into' if sign > 0 else 'unmerge from'}; "
                                     "nothing was changed")
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
    current = delta.new_zeros(delta.shape) if param is None else value(param)
    new = (widen(current) + delta.to(current.device)).to(current.dtype)
    if not torch.isfinite(delta).all() or not torch.isfinite(new).all():
        raise MergeError(
            f"merging adapter {p.adapter_name!r} into {path} would write non-finite values "
            f"(NaN/inf in the adapter, or overflow of {current.dtype}); no weight was changed. "
            "Check the adapter's training, or merge into a wider dtype"
        )


@torch.no_grad()
def _create_biases(model: nn.Module, missing: list[tuple[Placement, str]], writes: _Writes) -> None:
    for p, path in missing:
        module_path, _, name = path.rpartition(".")
        module = model.get_submodule(module_path)
        weight = model.get_parameter(p.site.weight_path)
        bias = nn.Parameter(weight.new_zeros(p.site.out_features), requires_grad=False)
        existed = hasattr(module, name)
        module.register_parameter(name, bias)
        writes.created.append((path, existed))


def remove_biases(model: nn.Module, created: list[str]) -> None:
    """Remove the biases :func:`fold` created (``Folded.created_biases``): the modules hold ``None`` again."""
    for path in created:
        module_path, _, name = path.rpartition(".")
        model.get_submodule(module_path).register_parameter(name, None)


@torch.no_grad()
def _write_deltas(model: nn.Module, placements: list[Placement], sign: int, progress: bool | None,
                  writes: _Writes) -> None:
    """Apply the deltas, each computed again on the weights as they are by then (a kind
    stacked on another's merged weight reads them), through ``writes``. Unmerging leaves
    packed weights alone: :func:`unfold` puts their bytes from before the merge back."""
    desc = "merging" if sign > 0 else "unmerging"
    ordered = placements if sign > 0 else placements[::-1]  # undo stacked kinds last-first
    with tqdm(ordered, desc=desc, unit="site", disable=hide_progress(progress, len(placements))) as bar:
        for p in bar:
            for path, param, delta in _deltas(model, p, sign):
                if param is None:
                    raise MergeError(f"{p}: no parameter {path} to merge into")
                if sign < 0 and is_packed(param):
                    continue
                writes.write(param, widen(value(param)) + sign * delta.to(param.device))


def mergeable_or_raise(placements: list[Placement]) -> None:
    bad = sorted({f"{p.adapter_name} ({p.adapter!r})" for p in placements if not p.adapter.mergeable})
    if bad:
        raise MergeError(
            f"adapters {bad} can't be folded into weights (they add tokens or activations, not weight "
            "deltas); nothing was merged. Delete or disable them first, or export the graph with them baked in"
        )
