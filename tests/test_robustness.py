"""Robustness: failures leave everything as it was, and an inactive adapter never reaches the output.

- gates select, never multiply: NaN/inf in an inactive or disabled adapter can't leak (NaN * 0 = NaN);
- merge / unmerge are all-or-nothing, even when interrupted while writing;
- raw exceptions (re.error, FileExistsError) become PeftcErrors naming the argument and the fix;
- save_pretrained replaces the config and the weights together or not at all;
- a config can't make peftc run code (no trust_remote_code passed to a tokenizer).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import assert_unchanged, make_llama, padded_batch, snapshot, two_adapter_llama
from torch import nn
from torch.nn import functional as F

import peftc
from peftc.formats import peft as peft_format
from peftc.testing.strategies import TinyMLP

aten = torch.ops.aten
QV = peftc.linear(r".*\.(q|v)_proj")


def _exactly(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"differ by up to {(a - b).abs().max().item()}"


# -- 1. gates select: an inactive adapter's values never reach the output -------------------------


def _poison(cm, adapter: str) -> None:
    """NaN and inf in every parameter of ``adapter``."""
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter_name == adapter:
                for i, t in enumerate(p.state.parameters()):
                    t.fill_(float("nan") if i % 2 == 0 else float("inf"))


@pytest.fixture(scope="module")
def two_llama_adapters():
    return two_adapter_llama(other=r".*\.(q|k|o)_proj")  # "other" shares q_proj: stacked on one op


def test_non_finite_inactive_or_disabled_adapters_never_reach_the_output(two_llama_adapters):
    cm, base = two_llama_adapters
    cm = copy.deepcopy(cm)
    ids, mask = padded_batch(3, 7)
    run = lambda **kw: cm(input_ids=ids, attention_mask=mask, **kw).logits  # noqa: E731
    names = ["default", "__base__", "other"]
    active, mixed = run(), run(adapter_names=names)
    with cm.disable_adapter():
        disabled = run()
    torch.testing.assert_close(disabled, base(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)

    _poison(cm, "other")  # inactive: LoRA A/B and the BitFit bias all NaN or inf
    _exactly(run(), active)
    poisoned_mixed = run(adapter_names=names)
    _exactly(poisoned_mixed[:2], mixed[:2])  # the rows running "default" and the base model
    _poison(cm, "default")  # now every adapter is non-finite
    with cm.disable_adapter():
        _exactly(run(), disabled)
    _exactly(run(adapter_names=["__base__"] * 3), disabled)
    cm.set_adapter("other")
    with cm.disable_adapter():
        _exactly(run(), disabled)


def test_non_finite_inactive_adapter_never_reaches_the_gradients():
    """Training: the inactive adapter's rows of its own branch get no gradient either, so a
    NaN in its A or B can't reach the active adapter's gradients (0 @ NaN is NaN)."""
    torch.manual_seed(0)
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=4, init=False, dropout=0.1).on(QV)], backend="eager")
    cm.add_adapter("other", [peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.(q|k)_proj"))])
    cm.train()
    ids, mask = padded_batch(3, 7)

    def grads():
        torch.manual_seed(1)  # the same dropout masks each time
        cm.zero_grad(set_to_none=True)
        loss = cm(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.state.lora_A.grad for p in cm.sites if p.adapter_name == "default"]

    loss, before = grads()
    _poison(cm, "other")
    poisoned_loss, after = grads()
    _exactly(poisoned_loss, loss)
    for a, b in zip(after, before, strict=True):
        _exactly(a, b)


def test_non_finite_inactive_bitfit_never_reaches_the_output():
    model = TinyMLP([6, 8, 5], ["linear", "matmul"], [False, True])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    cm = peftc.compile(model, [peftc.BitFit().on(peftc.linear())], example_inputs=(x,), backend="eager")
    with cm.disable_adapter():
        base = cm(x)
    _exactly(base, model.layers[1](torch.tanh(model.layers[0](x))))
    with torch.no_grad():
        for p in cm.sites:
            p.state.bias.fill_(float("nan"))
    assert cm(x).isnan().all()
    with cm.disable_adapter():
        _exactly(cm(x), base)


def test_active_lora_output_is_bit_identical_to_its_formula():
    """Selecting instead of multiplying leaves an active adapter's arithmetic alone: the graph's
    output is exactly ``y + (x A^T B^T) * scaling`` in the model's dtype, per row in a mixed batch."""
    model = TinyMLP([6, 10, 5], ["linear", "flinear"], [True, False])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    cm = peftc.compile(model, [peftc.LoRA(r=3, alpha=5, init=False).on(peftc.linear())],
                       example_inputs=(x,), backend="eager")
    cm.add_adapter("b", [peftc.LoRA(r=2, alpha=3, init=False).on(peftc.linear(r"layers\.1"))])
    states = {(p.adapter_name, p.path): p.state for p in cm.sites}

    def formula(adapters):
        h = x
        for i, layer in enumerate(model.layers):
            w, bias = (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer.dense()
            y = F.linear(h, w, bias)
            for name in adapters:
                s = states.get((name, f"layers.{i}"))
                if s is not None:
                    y = y + F.linear(F.linear(h, s.lora_A), s.lora_B) * s.scaling
            h = torch.tanh(y) if i == 0 else y
        return h

    with torch.no_grad():
        _exactly(cm(x), formula(["default"]))
        cm.set_adapter(["default", "b"])
        _exactly(cm(x), formula(["default", "b"]))
        cm.set_adapter("default")
        mixed = cm(x, adapter_names=["b", "default", "__base__", "b"])
        for row, names in enumerate([["b"], ["default"], [], ["b"]]):
            _exactly(mixed[row], formula(names)[row])


# -- 2. merge and unmerge are all-or-nothing -------------------------------------------------------


class FlakyDelta(peftc.Adapter):
    """``y + x D^T``: an additive kind whose merge or unmerge raises at chosen sites."""

    kind = "test_flaky_delta"

    def __init__(self):
        self.fail_merge: set[str] = set()
        self.fail_unmerge: set[str] = set()

    def init_state(self, site):
        state = nn.Module()
        state.delta = nn.Parameter(0.05 * torch.randn(site.out_features, site.in_features))
        return state

    def emit(self, b, site):
        return b.call(aten.add.Tensor, b.y, b.call(aten.linear.default, b.x, b.param("delta")))

    def _delta(self, site, state, failing):
        if site.weight_path in failing:
            raise RuntimeError(f"can't compute the delta of {site.weight_path}")
        d = state.delta.detach()
        return {site.weight_name: d if site.layout == "out_in" else d.T}

    def merge_delta(self, site, state, weights):
        return self._delta(site, state, self.fail_merge)

    def unmerge_delta(self, site, state, weights):
        return self._delta(site, state, self.fail_unmerge)

    def config(self):
        return {"kind": self.kind}


@pytest.fixture
def flaky():
    """A llama with a FlakyDelta on q/v (4 sites) and BitFit on the bias-less MLP (merging
    creates biases), its third FlakyDelta site, and a function running it."""
    torch.manual_seed(0)
    spec = FlakyDelta()
    cm = peftc.compile(make_llama(), [spec.on(QV), peftc.BitFit().on(peftc.linear(r".*mlp\.up_proj"))],
                       backend="eager").eval()
    with torch.no_grad():
        for p in cm.sites:
            if p.adapter.kind == "bitfit":
                p.state.bias.normal_()
    third = [p.site.weight_path for p in cm.sites if p.adapter is spec][2]
    ids, mask = padded_batch(2, 6)
    return cm, spec, third, lambda: cm(input_ids=ids, attention_mask=mask).logits


class _InterruptWriting:
    """Patch ``Tensor.copy_`` so that the first write into ``target``'s storage (through any
    view of it, such as a detached alias) raises KeyboardInterrupt."""

    def __init__(self, monkeypatch, target: torch.Tensor):
        original, self.fired = torch.Tensor.copy_, False
        storage = target.untyped_storage().data_ptr()

        def copy_(tensor, src, *args, **kwargs):
            if tensor.untyped_storage().data_ptr() == storage and not self.fired:
                self.fired = True
                raise KeyboardInterrupt
            return original(tensor, src, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "copy_", copy_)


def test_merge_delta_raising_merges_nothing(flaky):
    cm, spec, third, run = flaky
    before, out = snapshot(cm), run()
    spec.fail_merge = {third}
    with pytest.raises(RuntimeError, match="can't compute the delta"):
        cm.merge()
    assert not cm.merged
    assert_unchanged(cm, before)
    _exactly(run(), out)


def test_merge_interrupted_while_writing_is_undone(flaky, monkeypatch):
    cm, _, third, run = flaky
    before, out = snapshot(cm), run()
    interrupt = _InterruptWriting(monkeypatch, cm.base_model.get_parameter(third))
    with pytest.raises(KeyboardInterrupt):
        cm.merge()
    assert interrupt.fired and not cm.merged
    assert_unchanged(cm, before)  # the created MLP biases are gone too: same keys
    _exactly(run(), out)
    monkeypatch.undo()
    cm.merge()  # and it still merges afterwards
    torch.testing.assert_close(run(), out, atol=1e-5, rtol=0)


def test_unmerge_delta_raising_leaves_the_model_merged(flaky):
    cm, spec, third, run = flaky
    out = run()
    cm.merge()
    merged_before, merged_out = snapshot(cm), run()
    spec.fail_unmerge = {third}
    with pytest.raises(RuntimeError, match="can't compute the delta"):
        cm.unmerge()
    assert cm.merged
    assert_unchanged(cm, merged_before)
    _exactly(run(), merged_out)
    spec.fail_unmerge = set()
    cm.unmerge()
    assert not cm.merged
    torch.testing.assert_close(run(), out, atol=1e-5, rtol=0)


def test_unmerge_interrupted_while_writing_is_undone(flaky, monkeypatch):
    cm, _, third, run = flaky
    out = run()
    cm.merge()
    merged_before, merged_out = snapshot(cm), run()
    interrupt = _InterruptWriting(monkeypatch, cm.base_model.get_parameter(third))
    with pytest.raises(KeyboardInterrupt):
        cm.unmerge()
    assert interrupt.fired and cm.merged
    assert_unchanged(cm, merged_before)
    _exactly(run(), merged_out)
    monkeypatch.undo()
    cm.unmerge()
    torch.testing.assert_close(run(), out, atol=1e-5, rtol=0)


# -- 3. raw exceptions become PeftcErrors ----------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("target_modules", r".*\.(q_proj"), ("exclude_modules", r"[model"), ("layers_pattern", "lay(ers"),
    ("rank_pattern", {"q_proj(": 2}), ("alpha_pattern", {"*v_proj": 2}),
])
def test_invalid_regex_in_a_peft_config_is_a_rule_error(field, value):
    model = make_llama()
    before = snapshot(model)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], field: value}
    with pytest.raises(peftc.RuleError, match=rf"{field}.*regular expression") as info:
        peftc.compile(model, config, backend="eager")
    assert type(info.value) is peftc.RuleError
    assert_unchanged(model, before)


def test_invalid_layers_pattern_in_a_selector_is_a_rule_error():
    with pytest.raises(peftc.RuleError, match="layers_pattern.*regular expression"):
        peftc.linear(layers=[0], layers_pattern="(h")


def test_reading_a_file_as_an_adapter_folder(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"x")
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(peftc.PeftcError, match="is a file.*folder") as info:
        peftc.from_pretrained(model, path)
    assert type(info.value) is peftc.PeftcError and "does not exist" not in str(info.value)
    assert_unchanged(model, before)


def test_saving_onto_an_existing_file(tmp_path):
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=2).on(QV)], backend="eager")
    path = tmp_path / "taken"
    path.write_text("mine")
    with pytest.raises(peftc.PeftcError, match=f"{path}.*is a file") as info:
        cm.save_pretrained(path)
    assert type(info.value) is peftc.PeftcError
    assert path.read_text() == "mine"
    cm.add_adapter("b", [peftc.LoRA(r=2).on(QV)])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b").write_text("mine")  # where adapter "b"'s subfolder would go
    with pytest.raises(peftc.PeftcError, match="b.*is a file"):
        cm.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["b"] and (folder / "b").read_text() == "mine"


# -- 4. save_pretrained replaces config and weights together ---------------------------------------


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    """A compiled llama with adapters "default" and "b" saved to tmp_path, then changed (so a
    new save would differ in both files of both adapters)."""
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=2, init=False).on(QV)], backend="eager")
    cm.add_adapter("b", [peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.k_proj"))])
    cm.save_pretrained(tmp_path)
    old = {"default": _files(tmp_path), "b": _files(tmp_path / "b")}
    assert set(old["default"]) == set(old["b"]) == {peft_format.CONFIG_NAME, peft_format.WEIGHTS_NAME}
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_B.add_(1.0)
            p.state.lora_A.mul_(2.0)
    for p in cm.sites:  # a new config, too: another dropout
        p.adapter.dropout = 0.25
    return cm, tmp_path, old


def _assert_old_checkpoint(folder, old):
    assert _files(folder) == old["default"]  # both files, byte for byte, and no temporary files
    assert sorted(os.listdir(folder)) == sorted([*old["default"], "b"])
    assert _files(folder / "b") == old["b"]
    assert sorted(os.listdir(folder / "b")) == sorted(old["b"])


def _partial_then(exc):
    def write(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise exc
    return write


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("which", ["weights", "config"])
def test_a_failed_save_leaves_the_previous_checkpoint(saved, monkeypatch, which, exc):
    cm, folder, old = saved
    calls = []
    real = peft_format.save_file if which == "weights" else peft_format.write_config

    def fail_on_second(*args, **kwargs):  # adapter "default" writes fine, "b" fails partway
        path = args[1] if which == "weights" else args[0]  # save_file(tensors, path), write_config(path, config)
        calls.append(path)
        if len(calls) == 2:
            return _partial_then(exc)(path)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_format, "save_file" if which == "weights" else "write_config", fail_on_second)
    with pytest.raises(type(exc)):
        cm.save_pretrained(folder)
    assert len(calls) == 2
    _assert_old_checkpoint(folder, old)


def test_a_save_failing_between_renames_puts_the_old_files_back(saved, monkeypatch):
    cm, folder, old = saved
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # after default's two files are in place, before b's
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        cm.save_pretrained(folder)
    monkeypatch.undo()
    _assert_old_checkpoint(folder, old)
    cm.save_pretrained(folder)  # and a save that works replaces both
    new = _files(folder)
    assert new.keys() == old["default"].keys()
    assert all(new[k] != old["default"][k] for k in new)
    assert json.loads(new[peft_format.CONFIG_NAME])["lora_dropout"] == 0.25


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    cm = peftc.compile(make_llama(), [peftc.LoRA(r=2).on(QV)], backend="eager")
    monkeypatch.setattr(peft_format, "write_config", _partial_then(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        cm.save_pretrained(tmp_path / "new" / "adapter")
    assert not (tmp_path / "new" / "adapter").exists()


# -- 5. no code execution from a config ------------------------------------------------------------


def test_tokenizer_kwargs_from_a_config_never_trust_remote_code(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    calls = []

    def fake_from_pretrained(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return lambda text: {"input_ids": [1, 2, 3]}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
              "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "classify this",
              "tokenizer_name_or_path": str(tmp_path),
              "tokenizer_kwargs": {"trust_remote_code": True, "revision": "main", "use_fast": False,
                                   "code_revision": "x", "auto_map": {"AutoTokenizer": "evil.Tok"}}}
    with pytest.warns(UserWarning, match="trust_remote_code"):
        rules = peftc.load_rules(config, make_llama())
    assert calls == [(str(tmp_path), (), {"revision": "main", "use_fast": False, "trust_remote_code": False})]
    assert rules.rules[0].adapter.text == "classify this"


# -- 6. every site kind that saves also loads ------------------------------------------------------


class _BareHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 5))

    def forward(self, x):
        return x @ self.W


class _BareParameters(nn.Module):
    """``x @ self.W`` on a root-level parameter and on a submodule's, beside an nn.Linear."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 6))
        self.head = _BareHead()
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.head(x @ self.W))


def test_an_adapter_on_bare_parameters_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model, x = _BareParameters(), torch.randn(2, 4)
    lora = peftc.LoRA(r=2, alpha=4, init=False, rank_pattern={"head.W": 3})
    cm = peftc.compile(copy.deepcopy(model), lora.on(peftc.linear()), example_inputs=(x,), backend="eager")
    assert sorted(p.key for p in cm.sites) == ["W", "head.W", "out"]
    assert {p.key: p.state.r for p in cm.sites} == {"W": 2, "head.W": 3, "out": 2}
    cm.save_pretrained(tmp_path)
    loaded = peftc.from_pretrained(copy.deepcopy(model), tmp_path, example_inputs=(x,), backend="eager")
    assert {p.key: p.state.r for p in loaded.sites} == {"W": 2, "head.W": 3, "out": 2}
    saved, got = cm.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    with torch.no_grad():
        _exactly(loaded(x), cm(x))
        # and against the formula: each site's x @ W + s * (x @ A.T @ B.T) in float64
        h = x.double()
        for layer in ("W", "head.W", "out"):
            p = next(p for p in cm.sites if p.key == layer)
            w = dict(model.named_parameters())["out.weight" if layer == "out" else layer].double()
            base = h @ w.T + model.out.bias.double() if layer == "out" else h @ w
            h = base + float(p.state.scaling) * (h @ p.state.lora_A.double().T @ p.state.lora_B.double().T)
        torch.testing.assert_close(loaded(x).double(), h, atol=1e-5, rtol=1e-5)
