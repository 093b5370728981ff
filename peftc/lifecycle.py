"""Many adapters on one traced model: add, activate, delete, disable, combine, mix per row.

Switching is a write into the gate tensors (``peftc.gates.<name>``), so it
changes no graph: nothing is retraced or recompiled. A mixed batch sets the
gates per row for one call. Prompt and prefix adapters change sequence lengths,
so activating them selects (and, the first time, traces) another graph.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch

from .adapters.lora import LoRA, LoRAState
from .errors import MergeError, RuleError

BASE = "__base__"
_COMBINATIONS = ("linear", "cat", "svd")


class AdapterLifecycle:
    """Adapter management for :class:`~peftc.program.CompiledModel` (a mixin)."""

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters (empty inside :meth:`disable_adapter`)."""
        return [] if self._disabled else list(self._active)

    @property
    def adapters(self) -> list[str]:
        """Every adapter's name, active or not."""
        return list(self.peftc.adapters.keys())

    def add_adapter(self, name: str, rules, modules_to_save: list[str] | None = None) -> None:
        """Add adapter ``name`` from ``rules`` (any form :func:`peftc.load_rules` takes), inactive.

        Call :meth:`set_adapter` to use it. Graphs already built gain its
        (gated-off) nodes, which compiles them again once.
        """
        from .compile import match_rules, train_biases

        matched, selectors, saved, options = match_rules(self.base_model, rules, self._catalog, modules_to_save)
        self._register(name, matched, selectors, saved, options)
        train_biases(self.base_model, options["bias"], {s.path for s, _ in matched}, saved)
        self._refresh()

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters; only they train. No retrace, no recompile.

        In eval mode the ``requires_grad`` flags follow at the next ``train()``
        (compiled graphs guard on them; see :meth:`_update_trainability`)."""
        names = [names] if isinstance(names, str) else list(names)
        self._check_names(names)
        if self._merged:
            raise MergeError(f"adapters {self._merged_names} are merged; unmerge() before switching adapters")
        self._active = names
        self._update_gates()

    def delete_adapter(self, name: str) -> None:
        """Delete adapter ``name`` and its state. Deleting the active adapter activates the
        first remaining one (as PEFT does), with a warning."""
        self._check_names([name])
        if self._merged and name in self._merged_names:
            raise MergeError(f"adapter {name!r} is merged into the weights; unmerge() before deleting it")
        if any(n == name for n, _, _ in self._rewrites):  # its traces read its state: drop them
            self._variants = {k: vs for k, vs in self._variants.items() if not any(
                t.startswith(f"adapters.{name}.") for t in k[-1])}
        self._placements = [p for p in self._placements if p.adapter_name != name]
        self._rewrites = [r for r in self._rewrites if r[0] != name]
        for store in (self._saved, self._options, self._trainable):
            store.pop(name, None)
        del self.peftc.adapters[name]
        del self.peftc.saved[name]
        delattr(self.peftc.gates, name)
        if name in self._active:
            self._active.remove(name)
            if not self._active and self.adapters:
                self._active = [self.adapters[0]]
                warnings.warn(f"deleted the active adapter {name!r}; {self._active[0]!r} is active now",
                              stacklevel=2)
        self._update_gates()
        self._refresh()

    @contextmanager
    def disable_adapter(self):
        """Run the base model inside the block; the previous state comes back on exit.

        Unmerged, this turns every gate off. Merged, it takes the deltas out of
        the weights (the graph is the base graph already) and puts them back after.
        """
        if self._disabled:
            yield
            return
        self._disabled = True
        if self._merged:
            self._unfold()
        self._update_gates()
        try:
            yield
        finally:
            self._disabled = False
            if self._merged:
                self._refold()
            self._update_gates()

    @contextmanager
    def mixed_batch(self, adapter_names: list[str], batch_size: int):
        """Inside the block, row ``i`` of each batch runs adapter ``adapter_names[i]``
        (``"__base__"``: none). ``cm(..., adapter_names=[...])`` uses this."""
        names = list(adapter_names)
        self._check_names([n for n in names if n != BASE])
        if len(names) != batch_size:
            raise RuleError(f"adapter_names has {len(names)} entries for a batch of {batch_size} rows")
        if self._merged:
            raise MergeError("adapter_names can't pick adapters per row while they are merged; unmerge() first")
        if any(n in names for n, _, _ in self._rewrites) or any(self._saved[n] for n in set(names) - {BASE}):
            raise RuleError("adapter_names works with adapters that act per row (LoRA, BitFit, custom kinds); "
                            "prompt, prefix and modules_to_save adapters change the whole batch")
        rows = {name: torch.tensor([n == name for n in names], device=getattr(self.peftc.gates, name).device)
                for name in self.adapters}
        self._update_gates(rows)
        try:
            yield
        finally:
            self._update_gates()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """A new LoRA adapter combining others, with PEFT's semantics.

        Arguments:
            combination_type: ``"linear"`` (same ranks: A and B are weighted sums,
                the weight's square root on each side, its sign on A), ``"cat"``
                (ranks concatenated: exact sum of the weighted deltas) or
                ``"svd"`` (the weighted sum of the deltas, truncated to
                ``svd_rank``, default the largest rank). A negative weight negates.
            adapter_name: the new adapter's name; it is added inactive, with
                ``alpha = r`` (scaling 1) as in PEFT.
        """
        self._check_names(adapters)
        if combination_type not in _COMBINATIONS:
            raise RuleError(f"combination_type={combination_type!r}; use one of {_COMBINATIONS}")
        if len(weights) != len(adapters):
            raise RuleError(f"{len(adapters)} adapters but {len(weights)} weights")
        sources = [p for p in self._placements if p.adapter_name in adapters]
        if any(not isinstance(p.state, LoRAState) for p in sources):
            raise RuleError("add_weighted_adapter combines LoRA adapters only")
        ranks = {p.state.r for p in sources}
        if combination_type == "linear" and len(ranks) != 1:
            raise RuleError(f"combination_type='linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
        new_rank = {"linear": max(ranks), "cat": sum(_ranks_by_adapter(sources).values()),
                    "svd": svd_rank or max(ranks)}[combination_type]
        by_site: dict[str, list] = {}
        for p in sources:
            by_site.setdefault(p.site.weight_path, []).append(p)
        spec = LoRA(r=new_rank, alpha=new_rank)
        matched = [(group[0].site, spec) for group in by_site.values()]
        self._register(adapter_name, matched, [], [], {"bias": "none", "modules_to_save": []})
        new = {p.site.weight_path: p.state for p in self._placements if p.adapter_name == adapter_name}
        weight_of = dict(zip(adapters, weights, strict=True))
        with torch.no_grad():
            for key, group in by_site.items():
                a, b = _combine(combination_type, group, weight_of, new_rank, adapters)
                new[key].lora_A.copy_(a)
                new[key].lora_B.copy_(b)
        self._refresh()

    # -- internals ----------------------------------------------------------------

    def _check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peftc.adapters]
        if unknown:
            raise RuleError(f"unknown adapter(s) {unknown}; adapters: {self.adapters}")

    def _update_gates(self, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Write the gates (in place when the shape allows, so compiled graphs keep them)."""
        gates = self.peftc.gates
        for name in self.adapters:
            if rows is not None:
                value = rows[name]
            else:
                value = torch.tensor([name in self.active_adapters and not self._merged])
            current = getattr(gates, name)
            if current.shape == value.shape:
                current.copy_(value)
            else:
                gates.register_buffer(name, value.to(current.device))
        if self.training:
            self._update_trainability()

    def _update_trainability(self) -> None:
        """Only the active adapters require grad.

        Applied at once in training mode, and by ``train()``. In eval mode a
        switch leaves ``requires_grad`` alone, because compiled graphs guard on
        it: switching adapters while serving must not recompile.
        """
        for name, tree in self.peftc.adapters.items():
            trains = name in self._active and self._trainable.get(name, True)
            for p in (*tree.parameters(), *self.peftc.saved[name].parameters()):
                p.requires_grad_(trains)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self._update_trainability()
        return self


def _ranks_by_adapter(placements) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for p in placements:
        ranks[p.adapter_name] = max(ranks.get(p.adapter_name, 0), p.state.r)
    return ranks


def _combine(kind: str, group, weight_of: dict[str, float], new_rank: int, order: list[str]):
    """The new (A, B) at one site from the source placements there, PEFT's way."""
    group = sorted(group, key=lambda p: order.index(p.adapter_name))
    first = group[0].state
    a = torch.zeros(new_rank, first.lora_A.shape[1], dtype=first.lora_A.dtype, device=first.lora_A.device)
    b = torch.zeros(first.lora_B.shape[0], new_rank, dtype=first.lora_B.dtype, device=first.lora_B.device)
    if kind == "linear":
        for p in group:
            ws = weight_of[p.adapter_name] * float(p.state.scaling)
            a += math.copysign(math.sqrt(abs(ws)), ws) * p.state.lora_A
            b += math.sqrt(abs(ws)) * p.state.lora_B
    elif kind == "cat":
        parts_a = [weight_of[p.adapter_name] * float(p.state.scaling) * p.state.lora_A for p in group]
        parts_b = [p.state.lora_B for p in group]
        cat_a, cat_b = torch.cat(parts_a, 0), torch.cat(parts_b, 1)
        a[: cat_a.shape[0]] = cat_a
        b[:, : cat_b.shape[1]] = cat_b
    else:
        delta = sum(weight_of[p.adapter_name] * float(p.state.scaling) * (p.state.lora_B @ p.state.lora_A)
                    for p in group)
        u, s, vh = torch.linalg.svd(delta.float())
        b = (u[:, :new_rank] @ torch.diag(s[:new_rank])).to(b.dtype)
        a = vh[:new_rank].to(a.dtype)
        if b.shape[1] < new_rank:  # the delta's rank is below new_rank: pad with zeros
            b = torch.cat([b, b.new_zeros(b.shape[0], new_rank - b.shape[1])], 1)
            a = torch.cat([a, a.new_zeros(new_rank - a.shape[0], a.shape[1])], 0)
    return a, b
