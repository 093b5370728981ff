"""Any sequence of lifecycle operations leaves a compiled model in the state it reports, computing
what that state means (a hypothesis ``RuleBasedStateMachine``).

The machine drives a two-adapter Llama (:func:`conftest.two_adapter_llama`, eager backend)
through add_adapter / set_adapter / delete_adapter / disable_adapter (the context and the
``*_adapter_layers`` pair) / merge / unmerge / train / eval / mixed batches / add_weighted_adapter,
and keeps its own model of the state: the adapters, which are active, disabled or not, merged or not.
After every step it checks against references computed from scratch:

- ``adapters``, ``active_adapters``, ``merged`` are what the operations imply;
- the output equals a float64 recomputation: the pristine base model in float64 with each
  active adapter's term added at its modules by forward hooks, from its tensors
  (``scaling * (x A^T) B^T`` with the scaling from the adapter's own ``alpha / r``, plus BitFit's
  bias), and the base model's output when nothing is active. It is computed with every
  adapter that should not act holding NaN, so nothing inactive may reach the output;
- while nothing is merged into them, the base weights are the pristine ones within 1e-6
  (merge then unmerge restores them) and merge left no bias behind;
- in training mode exactly the active adapters' parameters require grad;
- an operation refused (``set_adapter`` while merged, deleting a merged adapter, a mixed
  batch while merged) raises its ``MergeError`` and changes nothing.

``make test`` runs a few derandomized examples; ``make fuzz`` runs ``PEFTC_FUZZ_EXAMPLES``
fresh ones of up to 60 steps (the ``peftc-fuzz`` profile in conftest.py). The compiled model
is built (traced) once; every example starts by putting it back exactly as built, through the
public API, and checks it is.
"""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch
from conftest import VOCAB, assert_unchanged, snapshot, two_adapter_llama, two_adapter_rules
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import peftc

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MODULE = {t: ("self_attn." if t in "qkvo" else "mlp.") + f"{t}_proj" for t in TARGETS}
BASE_ROW = "__base__"
IDS = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))


def _sites(module_regex: str) -> list[str]:
    return [MODULE[t] for t in TARGETS if re.fullmatch(module_regex, "x." + MODULE[t])]


class _Model:
    """What the machine knows of each adapter: the modules its LoRA and its BitFit adapt, and
    LoRA's scaling (``alpha / r``), as given when it was added."""

    def __init__(self):
        self.lora: dict[str, tuple[set[str], float]] = {}  # name -> (module suffixes, scaling)
        self.bitfit: dict[str, set[str]] = {}

    def add(self, name, lora=(), scaling=None, bitfit=()):
        if lora:
            self.lora[name] = (set(lora), scaling)
        if bitfit:
            self.bitfit[name] = set(bitfit)

    def drop(self, name):
        self.lora.pop(name, None)
        self.bitfit.pop(name, None)


_BUILT: dict = {}


def _built():
    """The compiled model, the pristine base in float64, and the values as built (once per run)."""
    if not _BUILT:
        cm, base = two_adapter_llama()
        with torch.no_grad():
            cm(input_ids=IDS)
            cm.train()
            cm(input_ids=IDS)  # both programs traced once, for every example
            cm.eval()
        _BUILT.update(cm=cm, ref=copy.deepcopy(base).double().eval(), base=base,
                      values={k: v.detach().clone() for k, v in cm.state_dict().items()})
    return _BUILT


def _reset(cm, values):
    """Put ``cm`` back as built: unmerged, enabled, "default" and "other" only, "default" active,
    eval mode, every value as built."""
    if cm.merged:
        cm.unmerge()
    cm.enable_adapter_layers()
    if cm.adapters[:2] != ["default", "other"]:  # one was deleted: add both again, in order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "deleted the active adapter"
            for name in cm.adapters:
                cm.delete_adapter(name)
        default_rules, other_rules = two_adapter_rules()
        cm.add_adapter("default", default_rules)
        cm.add_adapter("other", other_rules)
    for name in cm.adapters[2:]:
        cm.delete_adapter(name)
    cm.set_adapter("default")
    cm.eval()
    cm.zero_grad(set_to_none=True)
    cm.load_state_dict(values)  # strict: a bias merge created and unmerge left fails here


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        built = _built()
        self.cm, self.ref, self.pristine = built["cm"], built["ref"], built["base"]
        _reset(self.cm, built["values"])
        self.names = ["default", "other"]
        self.active = ["default"]
        self.disabled = False
        self.merged: list[str] | None = None
        self.training = False
        self.counter = 0
        self.model = _Model()
        self.model.add("default", lora=_sites(r".*\.(q|v)_proj"), scaling=8 / 4)
        self.model.add("other", lora=_sites(r".*\.(k|o)_proj"), scaling=4 / 2, bitfit=_sites(r".*mlp\..*"))

    # -- the reference --------------------------------------------------------------

    def _reference(self, acting: list[str]) -> torch.Tensor:
        """The float64 logits of the pristine base with ``acting``'s terms added by hooks."""
        by_module: dict[str, list] = {}
        for p in self.cm.sites:
            if p.adapter_name in acting:
                by_module.setdefault(p.path, []).append(p)
        hooks = []

        def hook(placements):
            def add_terms(module, args, out):
                x = args[0]
                for p in placements:
                    suffix = p.path.split(".", 3)[-1]
                    lora = self.model.lora.get(p.adapter_name)
                    if lora is not None and suffix in lora[0] and hasattr(p.state, "lora_A"):
                        a, b = p.state.lora_A.detach().double(), p.state.lora_B.detach().double()
                        out = out + lora[1] * (x @ a.T) @ b.T
                    elif suffix in self.model.bitfit.get(p.adapter_name, ()):
                        out = out + p.state.bias.detach().double()
                    else:
                        raise AssertionError(f"{p} sits where its adapter was not asked to")
                return out

            return add_terms

        for path, placements in by_module.items():
            hooks.append(self.ref.get_submodule(path).register_forward_hook(hook(placements)))
        try:
            with torch.no_grad():
                return self.ref(input_ids=IDS).logits
        finally:
            for h in hooks:
                h.remove()

    def _acting(self) -> list[str]:
        return [] if self.disabled else list(self.active)

    def _poisoned_run(self, acting: set[str], **kwargs) -> torch.Tensor:
        """The model's logits with every adapter outside ``acting`` (all of them while merged:
        their deltas are in the weights) holding NaN."""
        merged = self.cm.merged and not self.disabled
        kept = []
        with torch.no_grad():
            for name in self.names:
                if merged or name not in acting:
                    for t in self.cm.peftc.adapters[name].parameters():
                        kept.append((t, t.clone()))
                        t.fill_(float("nan"))
            try:
                return self.cm(input_ids=IDS, **kwargs).logits
            finally:
                for t, value in kept:
                    t.copy_(value)

    def _check_output(self):
        acting = self._acting()
        out = self._poisoned_run(set(acting))
        torch.testing.assert_close(out.double(), self._reference(acting), atol=1e-4, rtol=1e-4)

    def _refused(self, call, match: str):
        before, state = snapshot(self.cm), self._reported()
        with pytest.raises(peftc.MergeError, match=match):
            call()
        assert_unchanged(self.cm, before)
        assert self._reported() == state

    def _reported(self):
        return self.cm.adapters, self.cm.active_adapters, self.cm.merged, self.cm.training

    # -- rules ----------------------------------------------------------------------

    @rule(data=st.data())
    def add_adapter(self, data):
        name = f"a{self.counter}"
        self.counter += 1
        kind = data.draw(st.sampled_from(["lora", "bitfit", "both"]), label="kind")
        targets = data.draw(st.lists(st.sampled_from(TARGETS), min_size=2 if kind == "both" else 1,
                                     max_size=4, unique=True), label="targets")
        split = 1 if kind == "both" else (len(targets) if kind == "lora" else 0)
        lora, bitfit = targets[:split], targets[split:]
        r = data.draw(st.integers(1, 3), label="r")
        alpha = data.draw(st.sampled_from([1, 2, 4]), label="alpha")
        rules = []
        if lora:
            rules.append(peftc.LoRA(r=r, alpha=alpha, init=False).on(
                peftc.linear(r".*\.(" + "|".join(lora) + r")_proj")))
        if bitfit:
            rules.append(peftc.BitFit().on(peftc.linear(r".*\.(" + "|".join(bitfit) + r")_proj")))
        self.cm.add_adapter(name, rules)
        with torch.no_grad():
            for p in self.cm.sites:
                if p.adapter_name == name and hasattr(p.state, "bias"):
                    p.state.bias.normal_()
        self.names.append(name)
        self.model.add(name, lora=[MODULE[t] for t in lora], scaling=alpha / r,
                       bitfit=[MODULE[t] for t in bitfit])

    @rule(data=st.data())
    def set_adapter(self, data):
        names = data.draw(st.lists(st.sampled_from(self.names), max_size=3, unique=True), label="set_adapter")
        call = lambda: self.cm.set_adapter(names)  # noqa: E731
        if self.merged is not None:
            self._refused(call, "unmerge")
            return
        call()
        self.active = names

    @precondition(lambda self: len(self.names) > 1)
    @rule(data=st.data())
    def delete_adapter(self, data):
        name = data.draw(st.sampled_from(self.names), label="delete_adapter")
        if self.merged is not None and name in self.merged:
            self._refused(lambda: self.cm.delete_adapter(name), "unmerge")
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.cm.delete_adapter(name)
        self.names.remove(name)
        self.model.drop(name)
        moved = name in self.active and self.active == [name]
        if name in self.active:
            self.active.remove(name)
        if moved:
            self.active = [self.names[0]]
        assert moved == any("is active now" in str(w.message) for w in caught)

    @rule()
    def disable_adapter_context(self):
        with self.cm.disable_adapter():
            assert self.cm.active_adapters == []
            torch.testing.assert_close(self._poisoned_run(set()).double(), self._reference([]),
                                       atol=1e-4, rtol=1e-4)

    @rule(on=st.booleans())
    def adapter_layers(self, on):
        if on:
            self.cm.enable_adapter_layers()
        else:
            self.cm.disable_adapter_layers()
        self.disabled = not on

    @rule()
    def merge(self):
        if self.merged is not None:
            with pytest.warns(UserWarning, match="already merged"):
                self.cm.merge()
            return
        self.cm.merge()
        self.merged = list(self.active)

    @rule()
    def unmerge(self):
        if self.merged is None:
            with pytest.warns(UserWarning, match="not merged"):
                self.cm.unmerge()
            return
        self.cm.unmerge()
        self.merged = None

    @rule(mode=st.booleans())
    def train_or_eval(self, mode):
        self.cm.train(mode)
        self.training = mode

    @rule(data=st.data())
    def mixed_batch(self, data):
        rows = data.draw(st.lists(st.sampled_from([*self.names, BASE_ROW]), min_size=3, max_size=3),
                         label="adapter_names")
        call = lambda: self.cm(input_ids=IDS, adapter_names=rows)  # noqa: E731
        if self.merged is not None:
            self._refused(call, "unmerge")
            return
        # disabled: every row runs the base model, as in PEFT (so nothing acts, nothing may leak)
        acting = set() if self.disabled else {n for n in rows if n != BASE_ROW}
        out = self._poisoned_run(acting, adapter_names=rows)
        for i, name in enumerate(rows):
            ref = self._reference([] if name == BASE_ROW or self.disabled else [name])
            torch.testing.assert_close(out[i].double(), ref[i], atol=1e-4, rtol=1e-4)

    @precondition(lambda self: any(n not in self.model.bitfit for n in self.names))
    @rule(data=st.data())
    def add_weighted_adapter(self, data):
        lora_only = [n for n in self.names if n not in self.model.bitfit]
        sources = data.draw(st.lists(st.sampled_from(lora_only), min_size=1, max_size=3), label="sources")
        weights = data.draw(st.lists(st.sampled_from([-1.0, 0.5, 1.0, 2.0]), min_size=len(sources),
                                     max_size=len(sources)), label="weights")
        name = f"a{self.counter}"
        self.counter += 1
        self.cm.add_weighted_adapter(sources, weights, name, combination_type="cat")
        self.names.append(name)
        covered = set().union(*(self.model.lora[s][0] for s in sources))
        self.model.add(name, lora=covered, scaling=1.0)  # PEFT: alpha = r
        # "cat" is exact: at each site the new delta is the weighted sum of the sources' deltas
        by = {(p.adapter_name, p.path): p.state for p in self.cm.sites}
        for path in {p.path for p in self.cm.sites if p.adapter_name == name}:
            new = by[(name, path)]
            got = new.lora_B.detach().double() @ new.lora_A.detach().double()
            want = torch.zeros_like(got)
            for source, w in zip(sources, weights, strict=True):
                s = by.get((source, path))
                if s is not None:
                    want += w * self.model.lora[source][1] * (s.lora_B.detach().double() @ s.lora_A.detach().double())
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def reports_its_state(self):
        assert self.cm.adapters == self.names
        assert self.cm.active_adapters == self._acting()
        assert self.cm.merged == (self.merged is not None)
        assert self.cm.training == self.training

    @invariant()
    def computes_its_state(self):
        self._check_output()

    @invariant()
    def base_weights_are_pristine_unless_merged(self):
        if self.merged is not None and not self.disabled:
            return
        weights = dict(self.cm.base_model.named_parameters())
        assert weights.keys() == dict(self.pristine.named_parameters()).keys(), "merge left a bias behind"
        for n, p in self.pristine.named_parameters():
            torch.testing.assert_close(weights[n].detach(), p.detach(), atol=1e-6, rtol=0, msg=n)

    @invariant()
    def only_active_adapters_train(self):
        if not self.training:
            return
        for name in self.names:
            for t in self.cm.peftc.adapters[name].parameters():
                assert t.requires_grad == (name in self.active), name
        assert not any(p.requires_grad for p in self.cm.base_model.parameters())


_FUZZING = bool(os.environ.get("PEFTC_FUZZ_EXAMPLES"))
# make test: a few fixed examples; make fuzz: the loaded "peftc-fuzz" profile
Lifecycle.TestCase.settings = settings() if _FUZZING else settings(max_examples=6, stateful_step_count=15)
TestLifecycle = Lifecycle.TestCase
