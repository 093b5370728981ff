"""The adapter registry of a compiled model: every adapter's state, where it sits, and gates.

:class:`AdapterState` owns the ``peftc`` module tree that a
:class:`~peftc.compiled.CompiledModel` registers as its ``peftc`` attribute::

    peftc.adapters.<name>.<key>.<param>   each site's state (LoRA's lora_A, ...)
    peftc.saved.<name>.<module path>.<p>  trainable copies of modules_to_save modules
    peftc.gates.<name>                    a boolean per adapter (or per batch row): active?

and the records that say which state sits on which site (:class:`Placement`),
which adapters are active, and which train. It knows no graph and no trace:
:mod:`peftc.program` reads it to insert adapter nodes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters.base import Adapter
from .errors import RuleError
from .sites import Site

BASE = "__base__"  # the name that means "no adapter" in a mixed batch


@dataclass
class Placement:
    """One adapter on one site.

    Attributes:
        site: where (module path, op, shapes, graph nodes).
        adapter: the adapter spec.
        adapter_name: which named adapter this belongs to (``"default"``).
        state: the site's parameters and buffers (shared between sites for some kinds).
        key: where the state lives under ``peftc.adapters.<name>`` and, for PEFT, on disk.
    """

    site: Site
    adapter: Adapter
    adapter_name: str
    state: nn.Module
    key: str

    @property
    def target(self) -> str:
        """The state's attribute path under the graph module's ``peftc``."""
        return f"adapters.{self.adapter_name}.{self.key}"

    @property
    def path(self) -> str:
        return self.site.path

    @property
    def op(self) -> str:
        return self.site.op

    @property
    def nodes(self) -> list[str]:
        return self.site.nodes

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.state.parameters())

    def __str__(self):
        return f"{self.adapter_name}: {self.adapter!r} at {self.site}"


@dataclass
class AdapterRecord:
    """What one named adapter was built with, beyond its placements."""

    selectors: list  # its rules' selectors: some (patterns) find sites of their own in every graph
    saved_paths: list[str]  # modules_to_save module paths, copied under peftc.saved.<name>
    options: dict  # bias, modules_to_save, task_type (PEFT's options, for saving)
    trainable: bool = True
    placements: list[Placement] = field(default_factory=list)
    #: ``(adapter, state path)`` of each input rewrite (prompt, prefix), once per state:
    #: read on every forward call, so kept rather than derived.
    rewrites: list[tuple[Adapter, str]] = field(default_factory=list)


class AdapterState:
    """Every adapter of one compiled model: state tree, placements, activity, trainability."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.root = nn.Module()
        self.root.adapters = nn.ModuleDict()
        self.root.saved = nn.ModuleDict()
        self.root.gates = nn.Module()
        self.records: dict[str, AdapterRecord] = {}
        self.active: list[str] = []
        self.disabled = False

    # -- reading ---------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.records)

    @property
    def active_names(self) -> list[str]:
        """The adapters in effect: none while disabled."""
        return [] if self.disabled else list(self.active)

    @property
    def placements(self) -> list[Placement]:
        return [p for record in self.records.values() for p in record.placements]

    @property
    def selectors(self) -> list:
        return [s for record in self.records.values() for s in record.selectors]

    def saved(self, name: str) -> dict[str, nn.Module]:
        """Adapter ``name``'s ``modules_to_save`` copies, by module path."""
        tree = self.root.saved[name]
        return {path: tree.get_submodule(path) for path in self.records[name].saved_paths}

    def rewrites(self, names: list[str]) -> list[tuple[Adapter, str]]:
        """``(adapter, state path)`` of each input rewrite (prompt, prefix) of ``names``."""
        return [r for name, record in self.records.items() if name in names for r in record.rewrites]

    def check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.records]
        if unknown:
            raise RuleError(f"unknown adapter(s) {unknown}; adapters: {self.names}")

    # -- changing --------------------------------------------------------------

    def register(self, name: str, matched: list[tuple[Site, Adapter]], selectors: list,
                 saved_paths: list[str], options: dict, trainable: bool = True) -> None:
        """Add adapter ``name``'s state, inactive and frozen. Raises before changing anything."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == BASE:
            raise RuleError(f"adapter name {name!r} must be a Python identifier (and not {BASE!r})")
        if name in self.records:
            raise RuleError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first")
        states = []
        by_adapter: dict[int, tuple[Adapter, list[Site]]] = {}
        for site, adapter in matched:
            by_adapter.setdefault(id(adapter), (adapter, []))[1].append(site)
        for adapter, sites in by_adapter.values():
            for site, (key, state) in zip(sites, adapter.init_states(sites, self.model), strict=True):
                if not any(True for _ in state.parameters()):
                    raise RuleError(f"adapter kind {type(adapter).__name__} declares no parameters at {site.path}; "
                                    "an adapter must add at least one trainable parameter")
                states.append((adapter, site, key, state))
        tree = nn.Module()
        placements, rewrites = [], []
        for adapter, site, key, state in _unique_keys(states):
            placement = Placement(site, adapter, name, state, key)
            if not _has_path(tree, key):
                _set_path(tree, key, state.to(site.device))
                if adapter.rewrites_inputs:
                    rewrites.append((adapter, placement.target))
            placements.append(placement)
        saved = nn.Module()
        for path in saved_paths:
            _set_path(saved, path, copy.deepcopy(self.model.get_submodule(path)))
        for p in (*tree.parameters(), *saved.parameters()):
            p.requires_grad_(False)
        self.root.adapters[name] = tree
        self.root.saved[name] = saved
        self.root.gates.register_buffer(name, torch.zeros(1, dtype=torch.bool, device=_device(self.model)))
        self.records[name] = AdapterRecord(list(selectors), list(saved_paths), dict(options), trainable,
                                           placements, rewrites)

    def delete(self, name: str) -> None:
        """Forget adapter ``name`` and its state (selectors included)."""
        del self.records[name]
        del self.root.adapters[name]
        del self.root.saved[name]
        delattr(self.root.gates, name)
        if name in self.active:
            self.active.remove(name)

    def write_gates(self, on: bool, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Set each gate: ``rows[name]`` (one flag per batch row) or, without ``rows``, whether
        the adapter is active (and ``on``). In place when the shape allows, so compiled
        graphs keep reading the same tensor."""
        gates = self.root.gates
        active = self.active_names
        for name in self.names:
            value = rows[name] if rows is not None else torch.tensor([on and name in active])
            current = getattr(gates, name)
            if current.shape == value.shape:
                current.copy_(value)
            else:
                gates.register_buffer(name, value.to(current.device))

    def update_trainability(self) -> None:
        """Only the active adapters' (trainable) state requires grad."""
        for name, record in self.records.items():
            trains = name in self.active and record.trainable
            for p in (*self.root.adapters[name].parameters(), *self.root.saved[name].parameters()):
                p.requires_grad_(trains)


def train_biases(model: nn.Module, bias: str, adapted: set[str], saved: list[str]) -> None:
    """PEFT's ``bias`` option: ``"all"`` biases train, or those of adapted modules (``"lora_only"``).

    The originals of ``modules_to_save`` modules stay frozen: their copies train.
    """
    if bias == "none":
        return
    for name, p in model.named_parameters():
        module_path, _, pname = name.rpartition(".")
        if any(name.startswith(path + ".") for path in saved):
            continue
        if pname == "bias" and (bias == "all" or module_path in adapted):
            p.requires_grad_(True)


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


def _set_path(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register ``module`` at ``root.<dotted>``, creating empty containers on the way."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


def _has_path(root: nn.Module, dotted: str) -> bool:
    try:
        root.get_submodule(dotted)
        return True
    except AttributeError:
        return False


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
