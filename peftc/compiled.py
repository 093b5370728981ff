"""The object users hold: :class:`CompiledModel`, the user's model with adapters in its graph.

It is composed of three parts, each in its own file:

- :class:`~peftc.state.AdapterState` (``cm.state``): every adapter's state
  (the ``peftc`` module tree), placements, which adapters are active and train;
- :class:`~peftc.program.Programs` (``cm.programs``): one adapted, lowered
  graph per input signature, built lazily and rebuilt by one function;
- a :class:`~peftc.passes.merge.Folded` record while merged: what was folded
  into the weights and how to take it out.

This file holds the public API over them: the forward, the adapter lifecycle
(add, set, delete, disable, mix per row, combine), merge and unmerge, and the
save/export facades.
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import fx, nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch built without distributed support: nothing is ever sharded
    FSDPModule = ()

from .errors import CapacityError, MergeError, PeftcError, RuleError
from .formats import export as export_format
from .formats import peft as peft_format
from .generation import generate
from .passes.merge import Folded, fold, refold, remove_biases, residual_start, unfold
from .peft_surface import PeftSurface
from .program import Program, Programs, graph_of
from .quantization import dequantize_modules, plan, quantize_modules, quantize_spec
from .rules import checkpoint_rules, load_rules, match_rules
from .signature import as_keywords, needs_boundary, showing_signature_of
from .sites import EXPERTS, find_sites
from .state import BASE, AdapterState, Placement, Reserve, train_biases
from .trace import call_inputs, flatten, signature, trace, with_defaults


class CompiledModel(PeftSurface, nn.Module):
    """The user's model with adapters inserted into its traced graph.

    Call it as the model (``cm(input_ids=..., labels=...)``); it returns what
    the model returns. :func:`peftc.compile` builds one.

    Attributes:
        base_model: the user's model; its parameters are the graph's, never copied.
        peftc: every adapter's state: ``peftc.adapters.<name>.<key>.<param>`` (``<slot>``
            instead of ``<name>`` with a :class:`~peftc.Reserve`),
            ``peftc.saved.<name>.<module path>.<param>`` (``modules_to_save`` copies)
            and ``peftc.gates.<name>`` (whether the adapter is active).
        state: the adapter registry (:class:`~peftc.state.AdapterState`).
        programs: the graphs built so far (:class:`~peftc.program.Programs`); ``len``
            counts them.
    """

    def __init__(self, model: nn.Module, rules, example_inputs=None, *, backend="inductor",
                 adapter_name: str = "default", modules_to_save: list[str] | None = None,
                 trainable: bool = True, quantize=None, reserve: Reserve | None = None, optimize=None,
                 _then=None):
        super().__init__()
        args, kwargs = call_inputs(model, example_inputs)
        kwargs = with_defaults(model, kwargs)
        sig = signature(flatten(args, kwargs), model.training)
        first = trace(model, args, kwargs, sig)
        rules = load_rules(rules, model)
        spec = quantize_spec(quantize)
        if spec is not None and rules.quantize is not None and spec != rules.quantize:
            raise RuleError("quantize is given both to compile and in the rules, differently; give it once")
        spec = spec or rules.quantize
        if spec is not None:  # every check first; then quantize, releasing float weights; then trace that
            catalog = graph_of(first)
            paths = plan(spec, model, find_sites(catalog, model))
            match_rules(model, rules, catalog, modules_to_save)
            del first, catalog
            quantize_modules(model, spec, paths)
            first = trace(model, args, kwargs, sig)
        self.training = model.training
        self.base_model = model
        self.state = AdapterState(model)
        self.peftc = self.state.root
        self.programs = Programs(model, self.state, backend, first, optimize)
        self._folded: Folded | None = None
        self._add(adapter_name, rules, modules_to_save, trainable, freeze_base=True, reserve=reserve,
                  then=None if _then is None else lambda: _then(self))
        self.set_adapter(adapter_name)
        self.state.update_trainability()
        self.__class__ = showing_signature_of(CompiledModel, type(model))
        model.register_forward_pre_hook(_warn_direct_calls(weakref.ref(self)))
        if getattr(model, "is_activation_checkpointing", False):  # asked of the model (prepare_model_for_kbit_training)
            self.gradient_checkpointing_enable()

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, example_inputs=None,
                        is_trainable: bool = False, adapter_name: str = "default", rules=None,
                        **compile_kwargs) -> CompiledModel:
        """:func:`peftc.from_pretrained` (PEFT's ``PeftModel.from_pretrained``)."""
        config, tensors = peft_format.read_checkpoint(adapter_dir)
        rules = load_rules(rules, model) if rules is not None else checkpoint_rules(config, model, str(adapter_dir))
        with _fitting(model, adapter_dir):  # the weights load before a PiSSA residual is final
            cm = cls(model, rules, example_inputs, adapter_name=adapter_name, trainable=is_trainable,
                     _then=lambda cm: peft_format.load_tensors(cm, adapter_name, tensors, str(adapter_dir)),
                     **compile_kwargs)
        return cm if is_trainable else cm.eval()

    # -- calling ----------------------------------------------------------------

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward, adapted.

        Arguments:
            adapter_names: one adapter name per batch row (``"__base__"`` for
                none) to run a mixed batch; see :meth:`mixed_batch`.
        """
        if adapter_names is not None:
            with self.mixed_batch(adapter_names, _batch_size(args, kwargs)):
                return self.forward(*args, **kwargs)
        program, args, kwargs = self._select(args, kwargs)
        call_args, call_kwargs = program.trace.call_args(args, kwargs)
        return program.fn(*call_args, **call_kwargs)

    def _select(self, args: tuple, kwargs: dict) -> tuple[Program, tuple, dict]:
        if self.programs.sharding is None and isinstance(self, FSDPModule):
            raise PeftcError("torch's fully_shard (or Accelerate's FSDP plugin, in accelerator.prepare) sharded "
                             "this compiled model, but its graphs still read the whole weights. Shard it with "
                             "peftc.distributed.fully_shard(cm) instead (before accelerator.prepare: Accelerate "
                             "keeps a model that is sharded already), or call that after your own per-layer "
                             "fully_shard calls")
        rewrites = self.state.rewrites(self.state.active_names)
        kwargs = with_defaults(self.base_model, kwargs)
        if rewrites or needs_boundary(self.base_model, kwargs):  # the input boundary takes keywords only
            args, kwargs = (), as_keywords(self.base_model, args, kwargs)
        return self.programs.select(args, kwargs, rewrites, self._folded), args, kwargs

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's ``generate`` (transformers' loop: greedy, sampling, beam search,
        streamers...), each step run through the adapted graph with a KV cache.

        Arguments:
            adapter_names: one adapter name per input row (``"__base__"``: none), as in PEFT.

        Returns what the model's own ``generate`` returns. See :mod:`peftc.generation`.
        """
        return generate(self, *args, adapter_names=adapter_names, **kwargs)

    def __deepcopy__(self, memo):
        """An independent compiled model: the model, its adapters and the merge state copied;
        the copy traces its own graphs (its parameters are new objects)."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "programs"})
        hooks = new.base_model._forward_pre_hooks  # the copied hook warns about this model, not the copy
        for key, hook in list(hooks.items()):
            if getattr(hook, "__qualname__", "").startswith(_warn_direct_calls.__name__):
                del hooks[key]
        new.base_model.register_forward_pre_hook(_warn_direct_calls(weakref.ref(new)))
        new.programs = self.programs.copy_for(new.base_model, new.state)
        return new

    def program_for(self, *args, **kwargs) -> Program:
        """The program (``trace``, ``gm``, ``fn``) a call with these inputs runs, built if needed."""
        return self._select(args, kwargs)[0]

    def graph_module(self, *args, **kwargs) -> fx.GraphModule:
        """The adapted graph that a call with these inputs runs (tracing it if needed)."""
        return self.program_for(*args, **kwargs).gm

    def _apply(self, fn, recurse=True):
        # Moving or casting replaces buffers the graphs captured: trace again on the next call.
        self.programs.clear()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.state.update_trainability()
        return self

    # -- inspecting -------------------------------------------------------------

    @property
    def sites(self) -> list[Placement]:
        """Every matched site: ``path``, ``op``, ``nodes``, ``site`` shapes, ``adapter``,
        ``adapter_name``, ``num_params``."""
        return self.state.placements

    @property
    def adapters(self) -> list[str]:
        """Every adapter's name, active or not."""
        return self.state.names

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters (empty inside :meth:`disable_adapter`)."""
        return self.state.active_names

    @property
    def merged(self) -> bool:
        return self._folded is not None

    @property
    def created_biases(self) -> list[str]:
        """Paths of the biases ``merge`` created on bias-less linears (empty unless merged)."""
        return list(self._folded.created_biases) if self._folded is not None else []

    def saved_modules(self, name: str) -> dict[str, nn.Module]:
        """Adapter ``name``'s ``modules_to_save`` copies, by module path."""
        self.state.check_names([name])
        return self.state.saved(name)

    def adapter_options(self, name: str) -> dict:
        """Adapter ``name``'s options: ``bias``, ``modules_to_save``, ``task_type``."""
        self.state.check_names([name])
        return dict(self.state.records[name].options)

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

    # -- the adapter lifecycle --------------------------------------------------

    def add_adapter(self, name: str, rules, modules_to_save: list[str] | None = None) -> None:
        """Add adapter ``name`` from ``rules`` (any form :func:`peftc.load_rules` takes), inactive.

        Call :meth:`set_adapter` to use it. Graphs already built gain its
        (gated-off) nodes, which compiles them again once; with capacity reserved
        (:class:`peftc.Reserve`) it goes into a free slot and nothing compiles. A saved adapter's
        folder (config and weights) is loaded, weights included, and trains
        (:meth:`load_adapter` with ``is_trainable=True``).
        """
        if isinstance(rules, (str, os.PathLike)) and (Path(rules) / peft_format.WEIGHTS_NAME).is_file():
            if modules_to_save:
                raise RuleError("add_adapter(name, saved_folder) takes modules_to_save from the saved config; "
                                "don't pass modules_to_save")
            self.load_adapter(rules, name, is_trainable=True)
            return
        self._add(name, rules, modules_to_save)
        self._adapters_changed()

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     rules=None, hotswap: bool = False) -> None:
        """Add a saved adapter (PEFT's or peftc's format), weights and all, inactive (PEFT's ``load_adapter``).
        Given the name of an existing adapter, load the saved weights into it instead.

        Arguments:
            is_trainable: whether it trains when active; by default it is frozen.
            rules: only for adapters on pattern-matched sites (see :func:`peftc.from_pretrained`).
            hotswap: replace existing adapter ``adapter_name`` by the saved one, whatever its rank,
                scaling and sites, in place: nothing is traced or compiled again (PEFT's
                ``hotswap_adapter``). It must fit what the graphs hold for that adapter: LoRA of the
                same dropout on some of its sites (the sites it leaves out act as none), of a rank
                no larger. Compile with ``reserve=peftc.Reserve(max_rank=...)`` for larger ranks.

        Raises:
            PeftcError: a missing or corrupt file, or an adapter for another model (naming the
                keys and shapes that don't fit). The model is left as it was.
            CapacityError: an adapter that doesn't fit what the graphs hold (reserved slots and
                rank, or the hot-swapped adapter), naming that capacity. Nothing changes.
        """
        config, tensors = peft_format.read_checkpoint(adapter_dir)
        if hotswap:
            self._hotswap(adapter_name, config, tensors, str(adapter_dir), is_trainable, rules)
            return
        if adapter_name in self.adapters:
            peft_format.load_tensors(self, adapter_name, tensors, str(adapter_dir))  # all or nothing
            self._set_trainable(adapter_name, is_trainable)
            return
        model = self.base_model
        rules = load_rules(rules, model) if rules is not None else checkpoint_rules(config, model, str(adapter_dir))
        with _fitting(model, adapter_dir):
            self._add(adapter_name, rules, None, is_trainable,
                      then=lambda: peft_format.load_tensors(self, adapter_name, tensors, str(adapter_dir)))
        self._adapters_changed()

    def _hotswap(self, name: str, config: dict, tensors: dict, source: str, trainable: bool, rules) -> None:
        """``load_adapter(..., hotswap=True)``: check, load into fresh states, then write them in place."""
        if name not in self.adapters:
            raise PeftcError(f"hotswap replaces an existing adapter, and there is none named {name!r} "
                             f"(adapters: {self.adapters}); load_adapter without hotswap adds one")
        if self.merged and name in self._folded.names:
            raise MergeError(f"adapter {name!r} is merged into the weights; unmerge() before hot-swapping it")
        model = self.base_model
        rules = load_rules(rules, model) if rules is not None else checkpoint_rules(config, model, source)
        matched, _, saved, options = match_rules(model, rules, self.programs.catalog(), None)
        if saved or options["bias"] != "none":
            raise RuleError(f"can't hot-swap {source}: its modules_to_save or bias={options['bias']!r} change "
                            "the graph; load it under a new name instead")
        fresh = self.state.fresh(name, matched, what=f"can't hot-swap {source} into adapter {name!r}")
        peft_format.load_tensors(self, name, tensors, source, fresh)  # all or nothing, before any write
        self.state.install(name, fresh, options)
        self._set_trainable(name, trainable)

    def _set_trainable(self, name: str, trainable: bool) -> None:
        """Whether adapter ``name`` trains when active; the ``requires_grad`` flags follow now in training
        mode, at the next ``train()`` in eval mode (compiled graphs guard on them: serving must not recompile)."""
        self.state.records[name].trainable = trainable
        if self.training:
            self.state.update_trainability()

    def _adapters_changed(self) -> None:
        """An adapter was added or deleted: graphs gain or lose its nodes, unless they hold reserved slots."""
        if self.state.reserve is None:
            self.programs.rebuild(self._folded)

    def _add(self, name: str, rules, modules_to_save, trainable: bool = True, freeze_base: bool = False,
             reserve: Reserve | None = None, then=None) -> None:
        """Match ``rules`` and register the adapter (reserving room after its kind first, if asked),
        take its initial delta out of the base weights if its kind ``changes_base`` (PiSSA, OLoRA)
        and call ``then()`` (loading its weights). If anything raises, the adapter is gone and the
        weights are as they were."""
        matched, selectors, saved, options = match_rules(self.base_model, rules, self.programs.catalog(),
                                                         modules_to_save)
        if reserve is not None:
            self.state.reserve_slots(reserve, matched, selectors)
        self.state.register(name, matched, selectors, saved, options, trainable)
        try:
            placements = self.state.records[name].placements
            if self.merged and any(p.adapter.changes_base for p in placements):
                raise MergeError(f"adapter {name!r} starts from the base weights (PiSSA, OLoRA), which hold the "
                                 f"merged adapters {self._folded.names}; unmerge() before adding it")
            with residual_start(self.base_model, placements):
                if then is not None:
                    then()
        except BaseException:
            self.state.delete(name)
            raise
        if freeze_base:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
        train_biases(self.base_model, options["bias"], {s.path for s, _ in matched}, saved)

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters; only they train. No retrace, no recompile.

        In eval mode the ``requires_grad`` flags follow at the next ``train()``:
        compiled graphs guard on them, and switching adapters while serving must
        not recompile."""
        names = [names] if isinstance(names, str) else list(names)
        self.state.check_names(names)
        if self.merged:
            raise MergeError(f"adapters {self._folded.names} are merged; unmerge() before switching adapters")
        self.state.active = names
        self._write_gates()

    def delete_adapter(self, name: str) -> None:
        """Delete adapter ``name`` and its state. Deleting the active adapter activates the
        first remaining one (as PEFT does), with a warning."""
        self.state.check_names([name])
        if self.merged and name in self._folded.names:
            raise MergeError(f"adapter {name!r} is merged into the weights; unmerge() before deleting it")
        mine = f"adapters.{name}."  # programs traced through its input rewrites read its state
        self.programs.drop(lambda p: any(t.startswith(mine) for t in p.trace.rewrites))
        was_active = name in self.state.active
        self.state.delete(name)
        if was_active and not self.state.active and self.adapters:
            self.state.active = [self.adapters[0]]
            warnings.warn(f"deleted the active adapter {name!r}; {self.adapters[0]!r} is active now", stacklevel=2)
        self._write_gates()
        self._adapters_changed()

    @contextmanager
    def disable_adapter(self):
        """Run the base model inside the block; the previous state comes back on exit.

        Unmerged, this turns every gate off. Merged, it takes the deltas out of
        the weights (the graph is the base graph already) and puts them back after.
        """
        if self.state.disabled:
            yield
            return
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """Run the base model until :meth:`enable_adapter_layers` (PEFT's name); see :meth:`disable_adapter`."""
        if self.state.disabled:
            return
        if self._folded is not None:
            unfold(self.base_model, self._folded)  # all or nothing
        self.state.disabled = True
        self._write_gates()

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the active adapters act again."""
        if not self.state.disabled:
            return
        self.state.disabled = False
        if self._folded is not None:
            try:
                refold(self.base_model, self._folded)  # all or nothing
            except BaseException:
                self._now_unmerged()  # the weights are the base's: say so, in every part
                raise
        self._write_gates()

    @contextmanager
    def mixed_batch(self, adapter_names: list[str], batch_size: int):
        """Inside the block, row ``i`` of each batch runs adapter ``adapter_names[i]``
        (``"__base__"``: none); while disabled (:meth:`disable_adapter`) every row runs the
        base model, as in PEFT. ``cm(..., adapter_names=[...])`` uses this."""
        names = list(adapter_names)
        used = set(names) - {BASE}
        self.state.check_names(sorted(used))
        if len(names) != batch_size:
            raise RuleError(f"adapter_names has {len(names)} entries for a batch of {batch_size} rows")
        if self.merged:
            raise MergeError("adapter_names can't pick adapters per row while they are merged; unmerge() first")
        whole_batch = any(p.adapter.rewrites_inputs or not p.adapter.gated or p.site.kind == EXPERTS
                          for p in self.state.placements if p.adapter_name in used)
        if whole_batch or any(self.state.saved(n) for n in used):
            raise RuleError("adapter_names works with adapters that act per row (LoRA, BitFit, custom kinds); "
                            "prompt, prefix and modules_to_save adapters, and adapters on stacks of experts "
                            "(which change the experts' weights), change the whole batch")
        if self.state.disabled:  # as PEFT: inside disable_adapter() every row runs the base model
            yield
            return
        gates = self.state.root.gates
        rows = {name: torch.tensor([n == name for n in names], device=getattr(gates, self.state.home(name)).device)
                for name in self.adapters}
        self.state.write_gates(True, rows)
        try:
            yield
        finally:
            self._write_gates()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """A new adapter combining others of one kind, added inactive; the kind decides how
        (:meth:`peftc.Adapter.combine`). For LoRA, PEFT's semantics:

        Arguments:
            combination_type: ``"linear"`` (same ranks: A and B are weighted sums,
                the weight's square root on each side, its sign on A), ``"cat"``
                (ranks concatenated: exact sum of the weighted deltas) or
                ``"svd"`` (the weighted sum of the deltas, truncated to
                ``svd_rank``, default the largest rank). A negative weight negates.
            adapter_name: the new adapter's name; it gets ``alpha = r`` (scaling 1) as in PEFT.
        """
        if not adapters or len(weights) != len(adapters):
            raise RuleError(f"add_weighted_adapter needs one weight per adapter and at least one adapter; "
                            f"got {len(adapters)} adapters and {len(weights)} weights")
        self.state.check_names(adapters)
        order = {name: i for i, name in reversed(list(enumerate(adapters)))}  # first mention
        sources = sorted((p for p in self.state.placements if p.adapter_name in order),
                         key=lambda p: order[p.adapter_name])
        kinds = sorted({type(p.adapter).__name__ for p in sources})
        if len(kinds) != 1:
            raise RuleError(f"add_weighted_adapter combines adapters of one kind; got {kinds}")
        pairs = list(zip(adapters, weights, strict=True))  # a name given twice counts twice, as in PEFT
        spec, values = sources[0].adapter.combine(sources, pairs, combination_type, svd_rank)
        sites = {p.site.weight_path: p.site for p in sources}
        self.state.register(adapter_name, [(sites[key], spec) for key in values], [], [],
                            {"bias": "none", "modules_to_save": []})
        new = {p.site.weight_path: p.state for p in self.state.placements if p.adapter_name == adapter_name}
        with torch.no_grad():
            for key, tensors in values.items():
                for pname, value in tensors.items():  # the leading block: a reserved slot pads with zeros
                    new[key].get_parameter(pname)[tuple(map(slice, value.shape))].copy_(value)
        self._adapters_changed()

    def _write_gates(self) -> None:
        """Gates follow the active adapters (all off while merged: the weights hold them)."""
        self.state.write_gates(not self.merged)
        if self.training:
            self.state.update_trainability()

    # -- merging ----------------------------------------------------------------

    def merge(self, safe: bool = False, progress: bool | None = None) -> None:
        """Fold the active adapters into the weights and delete every adapter node. While disabled
        (:meth:`disable_adapter_layers`) they are merged as well, into the weights once enabled.

        Arguments:
            safe: first check that no merged weight would be NaN or infinite;
                on failure raise :class:`~peftc.MergeError` with every weight untouched.
            progress: show a progress bar (default: only for 64 sites or more).

        Raises:
            MergeError: an active adapter can't merge (prompt, prefix), two
                active adapters save the same module, or (``safe``) non-finite
                values. Nothing is merged then.
        """
        if self.merged:
            warnings.warn("adapters are already merged; nothing to do", stacklevel=2)
            return
        if self.programs.sharding is not None:
            raise MergeError("the weights are FSDP shards: merging would fold whole deltas into them. Save the "
                             "adapter (save_pretrained), then load and merge it into an unsharded model")
        if self.state.disabled:  # merge the adapters enabling runs (as PEFT does); out of the weights till then
            self.enable_adapter_layers()
            try:
                self.merge(safe, progress)
            finally:
                self.disable_adapter_layers()
            return
        names = self.state.active_names
        placements = [p for p in self.state.placements if p.adapter_name in names]
        self._folded = fold(self.base_model, placements, {n: self.state.saved(n) for n in names}, safe, progress)
        try:
            self._write_gates()
            self.programs.rebuild(self._folded)
        except BaseException:
            unfold(self.base_model, self._folded)
            self._now_unmerged()
            raise

    def unmerge(self, progress: bool | None = None) -> None:
        """Take merged adapters back out of the weights and re-insert every adapter's nodes."""
        if not self.merged:
            warnings.warn("adapters are not merged; nothing to do", stacklevel=2)
            return
        if not self.state.disabled:  # disabled: disable_adapter_layers took the deltas out already
            unfold(self.base_model, self._folded, progress)  # all or nothing
        self._now_unmerged()

    def _now_unmerged(self) -> None:
        """The merged deltas are out of the weights: drop the merge record and the biases merge
        created, and give every graph its adapter nodes back."""
        folded, self._folded = self._folded, None
        if folded.created_biases:  # graphs traced while merged read biases about to go
            self.programs.drop(lambda p: p.traced_merged)
        self.programs.rebuild(None)
        remove_biases(self.base_model, folded.created_biases)
        self._write_gates()

    def merge_and_unload(self, safe: bool = False, progress: bool | None = None,
                         dequantize: bool = False) -> nn.Module:
        """Merge, then return the user's own model object, now holding the merged weights.

        Arguments:
            dequantize: replace its 4-bit linears (``Linear4bit``) by ``nn.Linear`` with the
                dequantized merged weights: a float model. The compiled model no longer
                runs the base after this; use the returned model.
        """
        self.merge(safe=safe, progress=progress)
        if dequantize:
            dequantize_modules(self.base_model)
            self.programs.clear()
        return self.base_model

    # -- saving and exporting ---------------------------------------------------

    def save_pretrained(self, directory, adapters: list[str] | None = None,
                        path_initial_model_for_weight_conversion=None) -> None:
        """Write adapters in PEFT's format (``adapter_config.json`` + safetensors).

        ``default`` goes in ``directory``; other adapters in subfolders named after them.

        Arguments:
            path_initial_model_for_weight_conversion: as PEFT's: the folder a PiSSA/OLoRA
                adapter was saved to before training; it is then saved as a plain LoRA (twice
                the rank) for the original base model.
        """
        peft_format.save_pretrained(self, directory, adapters, path_initial_model_for_weight_conversion)

    def export(self, path, format: str = "pt2", example_inputs=None, **options):
        """Export the merged model for deployment: ``"pt2"``, ``"onnx"`` or ``"hf"``.

        Returns the path written; ``options``: ``verify``, ``atol``, ``rtol``.
        See :func:`peftc.formats.export.export` for what each format holds.
        """
        return export_format.export(self, path, format, example_inputs, **options)


PeftModel = CompiledModel  # PEFT's name: ``peftc.PeftModel.from_pretrained(model, adapter_dir)``


@contextmanager
def _fitting(model: nn.Module, adapter_dir):
    """Loading a saved adapter: on failure, restore the model's ``requires_grad`` flags, and
    report a rule that finds no fit as an adapter saved for another model."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    except BaseException as e:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        if isinstance(e, RuleError) and not isinstance(e, CapacityError):  # capacity errors say what to do
            raise PeftcError(f"the adapter in {adapter_dir} doesn't fit {type(model).__name__}: {e}") from e
        raise


def _warn_direct_calls(ref: weakref.ref):
    """A forward pre-hook for the user's model: calling it directly while adapters are active
    and unmerged runs the base model (its ``generate`` included), which is never what was meant."""

    def hook(model, args):
        cm = ref()
        if cm is None or model is not cm.base_model or cm.merged or not cm.active_adapters \
                or torch.compiler.is_exporting():  # (a deep copy of the model carries the hook too)
            return
        warnings.warn(f"{type(model).__name__} was called directly, without its adapters {cm.active_adapters}: "
                      "peftc's adapters live in the compiled model's graph. Call the compiled model instead "
                      "(cm(...), cm.generate(...)), or cm.merge_and_unload() to fold them into this model",
                      stacklevel=2)

    return hook


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise RuleError("adapter_names needs a batched tensor input to count rows against")
