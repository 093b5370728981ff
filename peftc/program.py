"""The compiled model: traces per input signature, adapter state, merge and unmerge.

:class:`CompiledModel` is an ``nn.Module`` over the user's own model. It holds

- ``base_model``: the user's model (its parameters are the graph's; never copied);
- ``peftc``: all adapter state: ``peftc.adapters.<name>.<module path>.<param>``,
  ``peftc.saved.<name>.<module path>.<param>`` for ``modules_to_save`` copies,
  and ``peftc.gates.<name>``, one boolean per adapter saying whether it is active;
- one graph per input signature and mode, built lazily: trace, insert adapter
  nodes (each adapter's output selected by its gate), lower.

Which adapters are active lives in the gate tensors, not in the graph, so
switching adapters or disabling them neither retraces nor recompiles. Only
prompt and prefix adapters, which change sequence lengths, select a trace of
their own (traced once per set of active prompt/prefix adapters, then cached).
Adding, deleting, and managing adapters is in :mod:`peftc.lifecycle`.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from .boundary import PREFIX, Boundary, as_keywords
from .errors import MergeError, RuleError
from .lifecycle import AdapterLifecycle
from .match import discover
from .passes.bias import attach_biases, detach_biases
from .passes.insert import STATE_ROOT, Placement, insert_adapters, strip_adapters
from .passes.lower import lower
from .passes.merge import (
    apply_deltas,
    create_biases,
    mergeable_or_raise,
    missing_biases,
    remove_biases,
)
from .passes.swap import swap_params
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


class CompiledModel(AdapterLifecycle, nn.Module):
    """The user's model with adapters inserted into its traced graph.

    Call it as the model (``cm(input_ids=..., labels=...)``); it returns what
    the model returns. Build one with :func:`peftc.compile`.
    """

    def __init__(self, model: nn.Module, backend, first: Trace):
        super().__init__()
        self.training = model.training
        self.base_model = model
        self.peftc = nn.Module()
        self.peftc.adapters = nn.ModuleDict()
        self.peftc.saved = nn.ModuleDict()
        self.peftc.gates = nn.Module()
        self._backend = backend
        self._placements: list[Placement] = []
        self._saved: dict[str, dict[str, nn.Module]] = {}
        self._options: dict[str, dict] = {}  # per adapter: bias, modules_to_save, task_type
        self._rewrites: list[tuple[str, object, str]] = []  # (name, adapter, target) of input rewriters
        self._selectors: list = []  # the rules' selectors: some find sites of their own
        self._active: list[str] = []
        self._trainable: dict[str, bool] = {}
        self._disabled = False
        self._merged = False
        self._merged_names: list[str] = []
        self._stash: dict[str, torch.Tensor] = {}  # originals of modules_to_save params while merged
        self._created_biases: list[str] = []  # biases merge created on bias-less linears
        self._variants: dict[tuple, list[_Variant]] = {}
        self._catalog = first  # the first trace: where new rules find their sites
        self._first = first  # reused once for the first call that fits it

    # -- building -------------------------------------------------------------

    def _register(self, name: str, matched: list[tuple[Site, object]], selectors: list,
                  saved_paths: list[str], options: dict, trainable: bool = True) -> None:
        """Add adapter ``name``'s state (inactive); the caller activates it."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == "__base__":
            raise RuleError(f"adapter name {name!r} must be a Python identifier (and not '__base__')")
        if name in self.peftc.adapters:
            raise RuleError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first")
        states = []
        by_adapter: dict[int, tuple[object, list[Site]]] = {}
        for site, adapter in matched:
            by_adapter.setdefault(id(adapter), (adapter, []))[1].append(site)
        for adapter, sites in by_adapter.values():
            for site, (key, state) in zip(sites, adapter.init_states(sites, self.base_model), strict=True):
                if not any(True for _ in state.parameters()):
                    raise RuleError(f"adapter kind {type(adapter).__name__} declares no parameters at {site.path}; "
                                    "an adapter must add at least one trainable parameter")
                states.append((adapter, site, key, state))
        states = _unique_keys(states)
        tree = nn.Module()
        placements, rewrites = [], []
        for adapter, site, key, state in states:
            target = f"adapters.{name}.{key}"
            if not _has_path(tree, key):
                set_path(tree, key, state.to(site.device))
                if adapter.rewrites_inputs:
                    rewrites.append((name, adapter, target))
            placements.append(Placement(site, adapter, name, state, target))
        self.peftc.adapters[name] = tree
        self.peftc.gates.register_buffer(name, torch.zeros(1, dtype=torch.bool, device=_device(self.base_model)))
        self._placements += placements
        self._rewrites += rewrites
        self._selectors += selectors
        self._add_saved(name, saved_paths)
        self._options[name] = options
        self._trainable[name] = trainable
        if rewrites:
            self._first = None  # that trace has no input boundary
        for p in tree.parameters():
            p.requires_grad_(False)

    def _add_saved(self, name: str, paths: list[str]) -> None:
        tree = self.peftc.saved[name] = nn.Module()
        copies = {}
        for path in paths:
            clone = copy.deepcopy(self.base_model.get_submodule(path))
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
            swap_params(v.gm, copies, name, v.trace.prefix)
        insert_adapters(v.gm, self._placements, sites, training=v.trace.key[0])

    def _refresh(self) -> None:
        """Rebuild every cached graph's adapter nodes after adapters were added or deleted."""
        for variants in self._variants.values():
            for v in variants:
                strip_adapters(v.gm)
                if not self._merged:
                    self._adapt(v)
                v.fn = lower(v.gm, self._backend)

    # -- calling --------------------------------------------------------------

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward, adapted.

        Arguments:
            adapter_names: one adapter name per batch row (``"__base__"`` for
                none) to run a mixed batch; see :meth:`~peftc.lifecycle.AdapterLifecycle.mixed_batch`.
        """
        if adapter_names is not None:
            with self.mixed_batch(adapter_names, _batch_size(args, kwargs)):
                return self.forward(*args, **kwargs)
        args, kwargs = self._inputs(args, kwargs)
        variant = self._variant(args, kwargs)
        call_args, call_kwargs = variant.trace.call_args(args, kwargs)
        return variant.fn(*call_args, **call_kwargs)

    def _active_rewrites(self) -> list[tuple[object, str]]:
        if self._disabled:
            return []
        return [(adapter, target) for name, adapter, target in self._rewrites if name in self._active]

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = with_defaults(self.base_model, kwargs)
        if self._active_rewrites():  # the input boundary takes keywords only
            return (), as_keywords(self.base_model, args, kwargs)
        return args, kwargs

    def _variant(self, args: tuple, kwargs: dict) -> _Variant:
        rewrites = self._active_rewrites()
        key = (*signature(args, kwargs, self.base_model.training), tuple(t for _, t in rewrites))
        for v in self._variants.get(key, ()):
            if v.trace.accepts(args, kwargs):
                return v
        first, self._first = self._first, None
        if first is not None and not rewrites and first.key == key[:-1] and first.accepts(args, kwargs):
            t = first
        elif rewrites:
            boundary = Boundary(self.base_model, self.peftc, rewrites)
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

    # -- public accessors (for formats, the CLI and tests) -------------------

    @property
    def programs(self) -> list[_Variant]:
        """Every graph built so far (one per input signature and mode)."""
        return [v for vs in self._variants.values() for v in vs]

    def traces(self) -> list[Trace]:
        """Every trace the model holds: those of built graphs, and the first (maybe unbuilt)."""
        out = [v.trace for v in self.programs]
        return out + [t for t in (self._first, self._catalog) if t is not None and t not in out]

    def program_for(self, *args, **kwargs) -> _Variant:
        """The program (``trace``, ``gm``, ``fn``) a call with these inputs runs, built if needed."""
        return self._variant(*self._inputs(args, kwargs))

    @property
    def created_biases(self) -> list[str]:
        """Paths of the biases ``merge`` created on bias-less linears (empty unless merged)."""
        return list(self._created_biases)

    def saved_modules(self, name: str) -> dict[str, nn.Module]:
        """Adapter ``name``'s ``modules_to_save`` copies, by module path."""
        return dict(self._saved.get(name, {}))

    def adapter_options(self, name: str) -> dict:
        """Adapter ``name``'s options: ``bias``, ``modules_to_save``, ``task_type``."""
        return dict(self._options.get(name, {}))

    # -- inspecting -----------------------------------------------------------

    @property
    def sites(self) -> list[Placement]:
        """Every matched site: ``path``, ``op``, ``nodes``, ``site`` shapes, ``adapter``,
        ``adapter_name``, ``num_params``."""
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
        """Fold the active adapters into the weights and delete every adapter node.

        Arguments:
            safe: first check that no merged weight would be NaN or infinite;
                on failure raise :class:`~peftc.MergeError` with every weight untouched.
            progress: show a progress bar (default: only for 64 sites or more).

        Raises:
            MergeError: an active adapter can't merge (prompt, prefix), two
                active adapters save the same module, or (``safe``) non-finite
                values. Nothing is merged then.
        """
        if self._merged:
            warnings.warn("adapters are already merged; nothing to do", stacklevel=2)
            return
        names = [] if self._disabled else list(self._active)
        placements = [p for p in self._placements if p.adapter_name in names]
        mergeable_or_raise(placements)
        copies = self._merged_copies(names)
        missing = missing_biases(self.base_model, placements, safe)
        if safe:
            for path, clone in copies.items():
                _check_module_finite(path, clone)
        self._created_biases = create_biases(self.base_model, missing)
        apply_deltas(self.base_model, placements, +1, progress)
        with torch.no_grad():
            for path, clone in copies.items():
                for pname, p in clone.named_parameters():
                    original = self.base_model.get_parameter(f"{path}.{pname}")
                    self._stash[f"{path}.{pname}"] = original.detach().clone()
                    original.copy_(p)
        self._merged, self._merged_names = True, names
        for variants in self._variants.values():
            for v in variants:
                strip_adapters(v.gm)
                attach_biases(v.gm, self.base_model, self._created_biases, v.trace.prefix)
                v.fn = lower(v.gm, self._backend)

    def _merged_copies(self, names: list[str]) -> dict[str, nn.Module]:
        copies: dict[str, nn.Module] = {}
        for name in names:
            for path, clone in self._saved.get(name, {}).items():
                if path in copies:
                    raise MergeError(f"active adapters both train a copy of {path}; merge one at a time")
                copies[path] = clone
        return copies

    def unmerge(self, progress: bool | None = None) -> None:
        """Take merged adapters back out of the weights and re-insert every adapter's nodes."""
        if not self._merged:
            warnings.warn("adapters are not merged; nothing to do", stacklevel=2)
            return
        self._unfold(progress)
        if self._created_biases:  # graphs traced while merged read biases about to go
            self._variants = {k: [v for v in vs if not v.traced_merged] for k, vs in self._variants.items()}
        for variants in self._variants.values():
            for v in variants:
                detach_biases(v.gm)
        remove_biases(self.base_model, self._created_biases)
        self._created_biases = []
        self._merged, self._merged_names = False, []
        self._refresh()

    def _unfold(self, progress: bool | None = None) -> None:
        """Subtract the merged deltas and restore saved modules: the weights only."""
        placements = [p for p in self._placements if p.adapter_name in self._merged_names]
        apply_deltas(self.base_model, placements, -1, progress)
        with torch.no_grad():
            for path, value in self._stash.items():
                self.base_model.get_parameter(path).copy_(value)
        self._stash.clear()

    def _refold(self) -> None:
        """Re-apply the merged deltas after :meth:`_unfold` (same adapters, same biases)."""
        placements = [p for p in self._placements if p.adapter_name in self._merged_names]
        apply_deltas(self.base_model, placements, +1, None)
        with torch.no_grad():
            for path, clone in self._merged_copies(self._merged_names).items():
                for pname, p in clone.named_parameters():
                    original = self.base_model.get_parameter(f"{path}.{pname}")
                    self._stash[f"{path}.{pname}"] = original.detach().clone()
                    original.copy_(p)

    def merge_and_unload(self, safe: bool = False, progress: bool | None = None) -> nn.Module:
        """Merge, then return the user's own model object, now holding the merged weights."""
        self.merge(safe=safe, progress=progress)
        return self.base_model

    # -- saving and exporting -------------------------------------------------

    def save_pretrained(self, directory, adapters: list[str] | None = None) -> None:
        """Write adapters in PEFT's format (``adapter_config.json`` + safetensors).

        ``default`` goes in ``directory``; other adapters in subfolders named after them.
        """
        from .formats.peft import save_pretrained

        save_pretrained(self, directory, adapters)

    def export(self, path, format: str = "pt2", example_inputs=None, **options):
        """Export the merged model for deployment: ``"pt2"``, ``"onnx"`` or ``"hf"``.

        Returns the path written; ``options``: ``verify``, ``atol``, ``rtol``.
        See :func:`peftc.formats.export.export` for what each format holds.
        """
        from .formats.export import export

        return export(self, path, format, example_inputs, **options)


def _unique_keys(states: list) -> list:
    """Key each state where no other state's key nests in or under it.

    A module with two adapted weights (``fc.weight`` and ``fc.proj``) would
    otherwise key one state at ``fc`` and nest the other under it; such sites
    are keyed by their full weight path instead. States shared by several
    sites (one prefix table) keep their one key.
    """
    owner: dict[str, int] = {}
    for _, _, key, state in states:
        owner.setdefault(key, id(state))
    clash = {k for k in owner for other in owner if other.startswith(k + ".")}
    clash |= {key for _, _, key, state in states if owner[key] != id(state)}
    out = [(a, s, s.weight_path if key in clash else key, st) for a, s, key, st in states]
    keys: dict[str, int] = {}
    for _, site, key, state in out:
        if keys.setdefault(key, id(state)) != id(state) or any(k.startswith(key + ".") for k in keys if k != key):
            raise RuleError(f"two adapter states would live at {key!r} (site {site}); use separate adapters")
    return out


def _has_path(root: nn.Module, dotted: str) -> bool:
    try:
        root.get_submodule(dotted)
        return True
    except AttributeError:
        return False


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise RuleError("adapter_names needs a batched tensor input to count rows against")


def _check_module_finite(path: str, module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise MergeError(f"modules_to_save copy {path}.{name} holds NaN/inf; no weight was changed")
