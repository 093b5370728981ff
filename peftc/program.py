"""The compiled model: traces per input signature, adapter state, merge and unmerge.

:class:`CompiledModel` is an ``nn.Module`` over the user's own model. It holds

- ``base_model``: the user's model (its parameters are the graph's; never copied);
- ``peftc``: all adapter state, ``peftc.adapters.<name>.<module path>.<param>``
  and ``peftc.saved.<name>.<module path>.<param>`` for ``modules_to_save`` copies;
- one graph per input signature and mode, built lazily: trace, swap
  ``modules_to_save`` reads, insert adapter nodes, lower.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from .boundary import PREFIX, Boundary, as_keywords
from .match import discover
from .passes.bias import attach_biases, detach_biases
from .passes.insert import STATE_ROOT, Placement, insert_adapters, strip_adapters
from .passes.lower import lower
from .passes.merge import (
    apply_deltas,
    check_finite,
    create_biases,
    mergeable_or_raise,
    missing_biases,
    remove_biases,
)
from .passes.swap import swap_params, unswap_params
from .sites import Site
from .trace import Trace, signature, trace, with_defaults


@dataclass
class _Variant:
    trace: Trace
    gm: fx.GraphModule
    fn: Callable
    traced_merged: bool = False  # traced while merged: its graph may read merge-created biases


def set_path(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register ``module`` at ``root.<dotted>``, creating empty containers on the way."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


class CompiledModel(nn.Module):
    """The user's model with adapters inserted into its traced graph.

    Call it as the model (``cm(input_ids=..., labels=...)``); it returns what
    the model returns. Build one with :func:`peftc.compile`.
    """

    def __init__(self, model: nn.Module, backend, first: Trace):
        super().__init__()
        self.base_model = model
        self.peftc = nn.Module()
        self.peftc.adapters = nn.ModuleDict()
        self.peftc.saved = nn.ModuleDict()
        self._backend = backend
        self._placements: list[Placement] = []
        self._saved: dict[str, dict[str, nn.Module]] = {}
        self._stash: dict[str, torch.Tensor] = {}
        self._created_biases: list[str] = []  # biases merge created on bias-less linears
        self._options: dict[str, dict] = {}  # per adapter: bias, modules_to_save, task_type
        self._merged = False
        self._variants: dict[tuple, list[_Variant]] = {}
        self._rewrites: list[tuple[object, str]] = []  # adapters that rewrite the model's inputs
        self._selectors: list = []  # the rules' selectors: some find sites of their own
        self._first = first

    # -- building -------------------------------------------------------------

    def _add_placements(self, name: str, matched: list[tuple[Site, object]], selectors: list) -> None:
        self._selectors += selectors
        tree = self.peftc.adapters[name] = nn.Module()
        by_adapter: dict[int, tuple[object, list[Site]]] = {}
        for site, adapter in matched:
            by_adapter.setdefault(id(adapter), (adapter, []))[1].append(site)
        for adapter, sites in by_adapter.values():
            registered: set[str] = set()
            for site, (key, state) in zip(sites, adapter.init_states(sites, self.base_model), strict=True):
                target = f"adapters.{name}.{key}"
                if key not in registered:
                    set_path(tree, key, state.to(site.device))
                    registered.add(key)
                    if adapter.rewrites_inputs:
                        self._rewrites.append((adapter, target))
                self._placements.append(Placement(site, adapter, name, state, target))
        if self._rewrites:
            self._first = None  # that trace has no input boundary

    def _add_saved(self, name: str, paths: list[str]) -> None:
        tree = self.peftc.saved[name] = nn.Module()
        copies = {}
        for path in paths:
            clone = copy.deepcopy(self.base_model.get_submodule(path))
            for p in clone.parameters():
                p.requires_grad_(True)
            set_path(tree, path, clone)
            copies[path] = clone
        self._saved[name] = copies

    def _build(self, t: Trace) -> _Variant:
        gm = t.module()
        gm.add_module(STATE_ROOT, self.peftc)
        variant = _Variant(t, gm, gm, traced_merged=self._merged)
        if not self._merged:
            self._adapt(variant)
        else:
            attach_biases(gm, self.base_model, self._created_biases, t.prefix)
        variant.fn = lower(gm, self._backend)
        return variant

    def _adapt(self, v: _Variant) -> None:
        found = discover(v.gm, self.base_model, v.trace.prefix, self._selectors)
        sites = {s.weight_path: s for s in found}
        for name, copies in self._saved.items():
            swap_params(v.gm, copies, f"saved.{name}", v.trace.prefix)
        insert_adapters(v.gm, self._placements, sites, training=v.trace.key[0])

    def _relower(self) -> None:
        for variants in self._variants.values():
            for v in variants:
                v.fn = lower(v.gm, self._backend)

    # -- calling --------------------------------------------------------------

    def forward(self, *args, **kwargs):
        args, kwargs = self._inputs(args, kwargs)
        variant = self._variant(args, kwargs)
        call_args, call_kwargs = variant.trace.call_args(args, kwargs)
        return variant.fn(*call_args, **call_kwargs)

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = with_defaults(self.base_model, kwargs)
        if self._rewrites:  # the input boundary takes keywords only
            return (), as_keywords(self.base_model, args, kwargs)
        return args, kwargs

    def _variant(self, args: tuple, kwargs: dict) -> _Variant:
        key = signature(args, kwargs, self.base_model.training)
        for v in self._variants.get(key, ()):
            if v.trace.accepts(args, kwargs):
                return v
        first, self._first = self._first, None
        if first is not None and first.key == key and first.accepts(args, kwargs):
            t = first
        elif self._rewrites:
            boundary = Boundary(self.base_model, self.peftc, self._rewrites)
            t = trace(self.base_model, args, kwargs, key, boundary, PREFIX)
        else:
            t = trace(self.base_model, args, kwargs, key)
        v = self._build(t)
        self._variants.setdefault(key, []).append(v)
        return v

    def graph_module(self, *args, **kwargs) -> fx.GraphModule:
        """The adapted graph that a call with these inputs runs (tracing it if needed)."""
        return self._variant(*self._inputs(args, kwargs)).gm

    def _apply(self, fn, recurse=True):
        # Moving or casting replaces buffers the graphs captured: trace again on the next call.
        self._variants.clear()
        return super()._apply(fn, recurse)

    # -- inspecting -----------------------------------------------------------

    @property
    def sites(self) -> list[Placement]:
        """Every matched site: ``path``, ``op``, ``nodes``, ``site`` shapes, ``adapter``, ``num_params``."""
        return list(self._placements)

    @property
    def merged(self) -> bool:
        return self._merged

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, counted as PEFT counts them."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- merging --------------------------------------------------------------

    def merge(self, safe: bool = False, progress: bool | None = None) -> None:
        """Fold every adapter into the weights and delete the adapter nodes.

        Arguments:
            safe: first check that no merged weight would be NaN or infinite;
                on failure raise :class:`~peftc.MergeError` with every weight untouched.
            progress: show a progress bar (default: only for 64 sites or more).
        """
        if self._merged:
            warnings.warn("adapters are already merged; nothing to do", stacklevel=2)
            return
        mergeable_or_raise(self._placements)
        missing = missing_biases(self.base_model, self._placements)
        if safe:
            check_finite(self.base_model, self._placements, +1)
            for copies in self._saved.values():
                for path, clone in copies.items():
                    _check_module_finite(path, clone)
        self._created_biases = create_biases(self.base_model, missing)
        apply_deltas(self.base_model, self._placements, +1, progress)
        with torch.no_grad():
            for copies in self._saved.values():
                for path, clone in copies.items():
                    for pname, p in clone.named_parameters():
                        original = self.base_model.get_parameter(f"{path}.{pname}")
                        self._stash[f"{path}.{pname}"] = original.detach().clone()
                        original.copy_(p)
        self._merged = True
        for variants in self._variants.values():
            for v in variants:
                strip_adapters(v.gm)
                unswap_params(v.gm)
                attach_biases(v.gm, self.base_model, self._created_biases, v.trace.prefix)
        self._relower()

    def unmerge(self, progress: bool | None = None) -> None:
        """Take merged adapters back out of the weights and re-insert their nodes."""
        if not self._merged:
            warnings.warn("adapters are not merged; nothing to do", stacklevel=2)
            return
        apply_deltas(self.base_model, self._placements, -1, progress)
        with torch.no_grad():
            for path, value in self._stash.items():
                self.base_model.get_parameter(path).copy_(value)
        self._stash.clear()
        if self._created_biases:  # graphs traced while merged read biases about to go
            self._variants = {k: [v for v in vs if not v.traced_merged] for k, vs in self._variants.items()}
        for variants in self._variants.values():
            for v in variants:
                detach_biases(v.gm)
        remove_biases(self.base_model, self._created_biases)
        self._created_biases = []
        self._merged = False
        for variants in self._variants.values():
            for v in variants:
                self._adapt(v)
        self._relower()

    def save_pretrained(self, directory, adapters: list[str] | None = None) -> None:
        """Write adapters in PEFT's format (``adapter_config.json`` + safetensors).

        ``default`` goes in ``directory``; other adapters in subfolders named after them.
        """
        from .formats.peft import save_pretrained

        save_pretrained(self, directory, adapters)

    def merge_and_unload(self, safe: bool = False, progress: bool | None = None) -> nn.Module:
        """Merge, then return the user's own model object, now holding the merged weights."""
        self.merge(safe=safe, progress=progress)
        return self.base_model


def _check_module_finite(path: str, module: nn.Module) -> None:
    from .errors import MergeError

    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise MergeError(f"modules_to_save copy {path}.{name} holds NaN/inf; no weight was changed")
