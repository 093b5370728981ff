"""The adapter registry of a compiled model: every adapter's state, where it sits, and gates.

:class:`AdapterState` owns the ``peftc`` module tree that a
:class:`~peftc.compiled.CompiledModel` registers as its ``peftc`` attribute::

    peftc.adapters.<name>.<key>.<param>   each site's state (LoRA's lora_A, ...)
    peftc.saved.<name>.<module path>.<p>  trainable copies of modules_to_save modules
    peftc.gates.<name>                    a boolean per adapter (or per batch row): active?

With capacity reserved (:class:`Reserve`), ``<name>`` is instead a slot's
(``slot0``, ``slot1``...): every slot has zeroed state of the reserved rank on the
first adapter's sites from the start, the graphs hold every slot's nodes, and an
adapter added, loaded, hot-swapped or deleted later only writes into a slot, in
place, so no graph changes and nothing compiles again.

Each adapter has a *room*: the placements whose nodes the graphs hold for it (its
own first placements, or its slot's). Hot-swapping writes another adapter's
values into the room (:meth:`AdapterState.fresh`, then :meth:`AdapterState.install`).

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
from .errors import CapacityError, RuleError
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
        key: where the state lives under ``peftc.adapters.<home>`` and, for PEFT, on disk.
        home: where its state and gate live: ``adapter_name``, or its reserved slot's name.
    """

    site: Site
    adapter: Adapter
    adapter_name: str
    state: nn.Module
    key: str
    home: str = ""

    def __post_init__(self):
        self.home = self.home or self.adapter_name

    @property
    def target(self) -> str:
        """The state's attribute path under the graph module's ``peftc``."""
        return f"adapters.{self.home}.{self.key}"

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
    #: the placements the graphs hold for it: its first ones, or its reserved slot's
    room: list[Placement] = field(default_factory=list)


@dataclass(frozen=True)
class Reserve:
    """Capacity reserved when compiling (``peftc.compile(..., reserve=peftc.Reserve(16, 4))``),
    so that adapters added, loaded, hot-swapped, switched or deleted later compile nothing again.

    The graphs hold ``slots`` LoRA adapters of rank ``max_rank`` on the first adapter's
    sites, with its dropout; unused rank is zero (exact: outputs, gradients and saved
    files are the adapter's own). Every later adapter must be a LoRA on some of those
    sites, of rank ``max_rank`` or less, with the same dropout.

    Arguments:
        max_rank: the largest LoRA rank any adapter may have.
        slots: how many adapters the model holds at once, the first included.
    """

    max_rank: int
    slots: int

    def __post_init__(self):
        for what, value in (("max_rank", self.max_rank), ("slots", self.slots)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RuleError(f"Reserve {what}={value!r} must be a positive integer")

    def __str__(self):
        return f"peftc.Reserve(max_rank={self.max_rank}, slots={self.slots})"


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
        self.reserve: Reserve | None = None
        self._slots: list[list[Placement]] = []  # each reserved slot's placements (its room)
        self._slot_selectors: list = []

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
    def graph_placements(self) -> list[Placement]:
        """What the graphs hold: every reserved slot (used or not), else each adapter's room."""
        if self.reserve is not None:
            return [p for slot in self._slots for p in slot]
        return [p for record in self.records.values() for p in record.room]

    @property
    def selectors(self) -> list:
        """The selectors that find the graph placements' sites (patterns find their own in each graph)."""
        if self.reserve is not None:
            return list(self._slot_selectors)
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

    def reserve_slots(self, reserve: Reserve, matched: list[tuple[Site, Adapter]], selectors: list) -> None:
        """Make room for ``reserve.slots`` adapters of rank up to ``reserve.max_rank`` on the sites of
        ``matched`` (the first adapter's), each slot zeroed. Call once, before the first :meth:`register`."""
        reserved: dict[int, Adapter] = {}  # one slot spec per spec: sites that share a spec still do
        specs = [(site, reserved.setdefault(id(adapter), adapter.reserved(reserve.max_rank)))
                 for site, adapter in matched]
        for i in range(reserve.slots):
            home = f"slot{i}"
            slot = [Placement(site, spec, home, state, key) for spec, site, key, state in self._init(specs)]
            self._plant(home, slot)
            for p in slot:
                p.adapter.clear(p.state)
            self._slots.append(slot)
        self.reserve, self._slot_selectors = reserve, list(selectors)

    def register(self, name: str, matched: list[tuple[Site, Adapter]], selectors: list,
                 saved_paths: list[str], options: dict, trainable: bool = True) -> None:
        """Add adapter ``name``'s state, inactive and frozen; into a free slot when capacity is
        reserved. Raises before changing anything."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == BASE:
            raise RuleError(f"adapter name {name!r} must be a Python identifier (and not {BASE!r})")
        if name in self.records:
            raise RuleError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first")
        if self.reserve is not None:
            self._register_in_slot(name, matched, selectors, saved_paths, options, trainable)
            return
        placements, rewrites = [], []
        states = self._init(matched)
        for adapter, site, _, state in states:
            if not any(True for _ in state.parameters()):
                raise RuleError(f"adapter kind {type(adapter).__name__} declares no parameters at {site.path}; "
                                "an adapter must add at least one trainable parameter")
        tree = nn.Module()
        for adapter, site, key, state in states:
            placement = Placement(site, adapter, name, state, key)
            if not _has_path(tree, key):
                _set_path(tree, key, state.to(site.device))
                if adapter.rewrites_inputs:
                    rewrites.append((adapter, placement.target))
            placements.append(placement)
        for p in tree.parameters():
            p.requires_grad_(False)
        self.root.adapters[name] = tree
        self._add_record(name, selectors, saved_paths, options, trainable, placements, rewrites, placements)

    def _register_in_slot(self, name, matched, selectors, saved_paths, options, trainable) -> None:
        free = [i for i, slot in enumerate(self._slots) if not any(r.room is slot for r in self.records.values())]
        if not free:
            raise CapacityError(f"can't add adapter {name!r}: all {self.reserve.slots} adapter slots of {self.reserve} "
                            f"are taken ({', '.join(self.names)}). delete_adapter one, or compile with "
                            f"peftc.Reserve(max_rank={self.reserve.max_rank}, slots={self.reserve.slots + 1})")
        if saved_paths:
            raise CapacityError(f"can't add adapter {name!r} into a slot of {self.reserve}: modules_to_save "
                            f"({saved_paths}) change the graph. Compile without reserve to use them")
        room = self._slots[free[0]]
        placements = self.fresh(name, matched, room, f"can't add adapter {name!r}")
        self._add_record(name, selectors, [], options, trainable, [], [], room)
        self.install(name, placements, options)

    def _init(self, matched: list[tuple[Site, Adapter]]) -> list[tuple[Adapter, Site, str, nn.Module]]:
        """Each site's fresh state from its adapter: ``(adapter, site, key, state)``, keys unique."""
        states = []
        by_adapter: dict[int, tuple[Adapter, list[Site]]] = {}
        for site, adapter in matched:
            by_adapter.setdefault(id(adapter), (adapter, []))[1].append(site)
        for adapter, sites in by_adapter.values():
            for site, (key, state) in zip(sites, adapter.init_states(sites, self.model), strict=True):
                states.append((adapter, site, key, state.to(site.device)))
        return _unique_keys(states)

    def _plant(self, home: str, placements: list[Placement]) -> None:
        """Hang ``placements``' states under ``peftc.adapters.<home>``, frozen, with a gate (off)."""
        tree = nn.Module()
        for p in placements:
            if not _has_path(tree, p.key):
                _set_path(tree, p.key, p.state)
        for param in tree.parameters():
            param.requires_grad_(False)
        self.root.adapters[home] = tree
        self.root.gates.register_buffer(home, torch.zeros(1, dtype=torch.bool, device=_device(self.model)))

    def _add_record(self, name, selectors, saved_paths, options, trainable, placements, rewrites, room) -> None:
        saved = nn.Module()
        for path in saved_paths:
            _set_path(saved, path, copy.deepcopy(self.model.get_submodule(path)))
        for p in saved.parameters():
            p.requires_grad_(False)
        self.root.saved[name] = saved
        if self.reserve is None:
            self.root.gates.register_buffer(name, torch.zeros(1, dtype=torch.bool, device=_device(self.model)))
        self.records[name] = AdapterRecord(list(selectors), list(saved_paths), dict(options), trainable,
                                           placements, rewrites, room)

    def fresh(self, name: str, matched: list[tuple[Site, Adapter]], room: list[Placement] | None = None,
              what: str = "") -> list[Placement]:
        """Placements of ``matched`` with fresh states of their own, checked to fit ``room`` (by
        default adapter ``name``'s); :meth:`install` writes them in. Nothing changes here.

        Raises:
            CapacityError: a site the room doesn't hold, or an adapter that doesn't fit it (a larger
                rank, another dropout or kind), naming the capacity the graphs were built with.
        """
        room = self.records[name].room if room is None else room
        what = what or f"can't hot-swap into adapter {name!r}"
        by_path = {p.site.weight_path: p for p in room}
        capacity = (f"the graphs were compiled with {self.reserve}" if self.reserve is not None else
                    f"the graphs hold adapter {name!r} as it was added; to load other ranks or sites without "
                    "recompiling, compile with reserve=peftc.Reserve(max_rank=..., slots=...)")
        outside = [site.path for site, _ in matched if site.weight_path not in by_path]
        if outside:
            held = sorted(p.site.path for p in room)
            raise CapacityError(f"{what}: it targets {outside[:8]}, where the slot has no room; it holds "
                            f"{len(held)} sites ({', '.join(held[:8])}{' ...' if len(held) > 8 else ''}); "
                            f"{capacity}")
        targeted = {site.weight_path for site, _ in matched}
        uncleared = sorted(p.site.path for p in room if p.site.weight_path not in targeted and not p.adapter.clearable)
        if uncleared:
            raise CapacityError(f"{what}: it leaves out {uncleared[:8]}, and a {type(room[0].adapter).__name__} "
                            f"there can't be emptied; target the same sites")
        placements = []
        for adapter, site, _, state in self._init(matched):
            if adapter.rewrites_inputs:
                raise CapacityError(f"{what}: {type(adapter).__name__} adapters rewrite the model's inputs; "
                                "load them under a new name instead")
            home = by_path[site.weight_path]
            why = adapter.misfit(site, home.adapter, home.state)
            if why is not None:
                raise CapacityError(f"{what}: {why}; {capacity}")
            placements.append(Placement(site, adapter, name, state, home.key, home.home))
        return placements

    def install(self, name: str, placements: list[Placement], options: dict) -> None:
        """Write :meth:`fresh` placements' values into adapter ``name``'s room, in place (emptying
        the sites they leave out), and make them its placements. The graphs are unchanged."""
        record = self.records[name]
        targeted = {p.site.weight_path: p for p in placements}
        installed = []
        for home in record.room:
            new = targeted.get(home.site.weight_path)
            if new is None:
                home.adapter.clear(home.state)
                continue
            new.adapter.fill(new.site, home.state, new.state)
            installed.append(Placement(new.site, new.adapter, name, home.state, home.key, home.home))
        record.placements, record.options = installed, dict(options)

    def delete(self, name: str) -> None:
        """Forget adapter ``name`` and its state (selectors included); a slot it held is emptied."""
        record = self.records.pop(name)
        if self.reserve is not None:
            for p in record.room:  # emptied, switched off and frozen: a free slot
                p.adapter.clear(p.state)
                getattr(self.root.gates, p.home).fill_(False)
                for param in p.state.parameters():
                    param.requires_grad_(False)
        else:
            del self.root.adapters[name]
            delattr(self.root.gates, name)
        del self.root.saved[name]
        if name in self.active:
            self.active.remove(name)

    def home(self, name: str) -> str:
        """Where adapter ``name``'s state and gate live: its name, or its slot's."""
        room = self.records[name].room
        return room[0].home if room else name

    def write_gates(self, on: bool, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Set each gate: ``rows[name]`` (one flag per batch row) or, without ``rows``, whether
        the adapter is active (and ``on``). In place when the shape allows, so compiled
        graphs keep reading the same tensor."""
        gates = self.root.gates
        active = self.active_names
        for name in self.names:
            value = rows[name] if rows is not None else torch.tensor([on and name in active])
            home = self.home(name)
            current = getattr(gates, home)
            if current.shape == value.shape:
                current.copy_(value)
            else:
                gates.register_buffer(home, value.to(current.device))

    def update_trainability(self) -> None:
        """Only the active adapters' (trainable) state requires grad."""
        for name, record in self.records.items():
            trains = name in self.active and record.trainable
            for p in (*self.root.adapters[self.home(name)].parameters(), *self.root.saved[name].parameters()):
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
