"""``cm.export(path, format)``: pt2, ONNX and hf artifacts against the unmerged model.

Each artifact is loaded back the way a deployment would load it (a fresh
process without peftc for pt2, onnxruntime for ONNX, plain transformers for hf)
and compared with the unmerged model's outputs, also on a batch size and length
other than the example's. Two ONNX exports at most in the suite (they are slow):
one here, one in test_cli.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, make_bert_cls, make_llama

import peftc
from peftc.formats.export import export_model

ATOL = 1e-4


def lora_llama(seed: int = 0):
    """A tiny Llama with LoRA on q/v whose B is non-zero (so merging changes the weights)."""
    model = make_llama(seed=seed)
    cm = peftc.compile(model, peftc.LoRA(r=4, alpha=8).on(peftc.linear(r".*\.(q|v)_proj")), backend="eager")
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_B.normal_(0, 0.5)
    return model, cm


@pytest.fixture(scope="module")
def shared():
    """One LoRA Llama for the pt2, ONNX and hf tests; each checks export leaves it as it was."""
    return lora_llama()


def batch(b: int, n: int, seed: int = 0, pad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, n), generator=g)
    mask = torch.ones_like(ids)
    if pad and n > 3:
        mask[0, :2] = 0  # left padding in row 0
    return {"input_ids": ids, "attention_mask": mask}


def unmerged_logits(cm, inputs: dict) -> torch.Tensor:
    assert not cm.merged
    with torch.no_grad():
        return cm(**inputs).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_restored(cm, model, before: dict, training: bool, merged: bool = False) -> None:
    assert cm.merged is merged
    assert cm.training is training and model.training is training
    after = weights(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0, msg=k)


def first_token(inputs: dict, logits: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Batch 1, length 1: in a causal LM the first token's logits depend on that token alone,
    so the reference is a slice of a longer batch's (no trace of its own needed)."""
    return {k: v[:1, :1] for k, v in inputs.items()}, logits[:1, :1]


def test_pt2_loads_without_peftc_and_runs_dynamic_shapes(shared, tmp_path):
    model, cm = shared
    cm.eval()
    checks = [batch(2, 8, seed=1), batch(3, 11, seed=2, pad=True)]
    expected = [unmerged_logits(cm, b) for b in checks]
    one, one_expected = first_token(checks[0], expected[0])
    checks.append(one)
    expected.append(one_expected)
    cm.train()  # export runs in eval mode and restores this
    before = weights(model)

    result = export_model(cm, tmp_path / "out", "pt2", example_inputs=batch(2, 8))
    assert result.path == tmp_path / "out" / "model.pt2" and result.path.is_file()
    assert result.merged and result.inputs == ["input_ids", "attention_mask"] and result.outputs == ["logits"]
    assert result.max_diff is not None and result.max_diff < ATOL
    assert result.checked_shapes[1]["input_ids"] != (2, 8)  # verified on another batch size and length
    assert_restored(cm, model, before, training=True)
    cm.eval()

    torch.save({"checks": checks, "expected": expected}, tmp_path / "checks.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        extra = {{"peftc.json": ""}}
        ep = torch.export.load({str(result.path)!r}, extra_files=extra)
        data = torch.load({str(tmp_path / "checks.pt")!r})
        module = ep.module()
        diffs = []
        with torch.no_grad():
            for inputs, expected in zip(data["checks"], data["expected"]):
                out = module(**inputs)
                assert isinstance(out, tuple) and len(out) == 1, type(out)
                assert out[0].shape == expected.shape, (out[0].shape, expected.shape)
                diffs.append(float((out[0] - expected).abs().max()))
        print(json.dumps({{"diffs": diffs, "meta": json.loads(extra["peftc.json"]),
                          "peftc": "peftc" in sys.modules, "transformers": "transformers" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["peftc"] is False and report["transformers"] is False
    assert report["meta"]["inputs"] == ["input_ids", "attention_mask"] and report["meta"]["outputs"] == ["logits"]
    assert max(report["diffs"]) < ATOL, report["diffs"]


def test_onnx_matches_unmerged_with_onnxruntime(shared, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, cm = shared
    cm.eval()
    before = weights(model)
    checks = [batch(2, 8, seed=4), batch(4, 13, seed=5, pad=True)]
    expected = [unmerged_logits(cm, b) for b in checks]
    one, one_expected = first_token(checks[0], expected[0])
    checks.append(one)
    expected.append(one_expected)

    path = cm.export(tmp_path / "llama.onnx", format="onnx")  # example: the trace cm already has
    assert path == tmp_path / "llama.onnx" and path.is_file()
    assert_restored(cm, model, before, training=False)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape[:2] == ["batch", "sequence"]  # dynamic axes, named
    for inputs, ref in zip(checks, expected, strict=True):
        (logits,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert logits.shape == tuple(ref.shape)
        # Rows of padding tokens attend to nothing; what they hold differs between
        # runtimes (eager and onnxruntime both), so compare the real tokens only.
        real = inputs["attention_mask"].bool()
        assert float((torch.from_numpy(logits) - ref)[real].abs().max()) < ATOL


def test_hf_loads_with_plain_transformers_and_keeps_cm_merged(shared, tmp_path):
    from transformers import LlamaForCausalLM

    model, cm = shared
    cm.eval()
    checks = [batch(2, 8, seed=7), batch(3, 5, seed=8, pad=True)]
    expected = [unmerged_logits(cm, b) for b in checks]
    cm.merge()  # already merged: it stays merged
    try:
        before = weights(model)
        path = cm.export(tmp_path / "hf", format="hf")
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert_restored(cm, model, before, training=False, merged=True)
    finally:
        cm.unmerge()

    loaded = LlamaForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert not any("lora" in k or "peftc" in k for k in loaded.state_dict())
    for inputs, ref in zip(checks, expected, strict=True):
        with torch.no_grad():
            out = loaded(**inputs)
        assert float((out.logits - ref).abs().max()) < ATOL


def test_hf_bert_with_modules_to_save(tmp_path):
    from transformers import BertForSequenceClassification

    model = make_bert_cls()
    cm = peftc.compile(model, peftc.LoRA(r=4, alpha=8).on(peftc.linear(r".*\.(query|value)")),
                       backend="eager", modules_to_save=["classifier"]).eval()
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_B.normal_(0, 0.5)
        for p in cm.peftc.saved.parameters():
            p.add_(0.5)  # the trained head differs from the base model's
    inputs = {**batch(3, 7, seed=9), "token_type_ids": torch.zeros(3, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = cm(**inputs).logits
        base_head = model.classifier.weight.detach().clone()

    result = export_model(cm, tmp_path / "bert", "hf", example_inputs=inputs)
    assert result.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert not cm.merged and torch.equal(model.classifier.weight, base_head)

    loaded = BertForSequenceClassification.from_pretrained(result.path, local_files_only=True).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert float((got - expected).abs().max()) < ATOL


def test_prefix_baked_into_pt2_and_hf_refused(tmp_path):
    model = make_llama(seed=3)
    cm = peftc.compile(model, [peftc.Prefix(num_virtual_tokens=3)], backend="eager").eval()
    inputs = batch(2, 8, seed=10)
    with torch.no_grad():
        adapted, plain = cm(**inputs).logits, model(**inputs).logits
    assert float((adapted - plain).abs().max()) > 1e-3  # the prefix changes the outputs

    with pytest.raises(peftc.PeftcError, match=r"format 'hf'.*'pt2' or 'onnx'") as info:
        cm.export(tmp_path / "hf", format="hf")
    assert "Prefix" in str(info.value)
    assert not (tmp_path / "hf").exists()

    # Verified on load against the prefix-adapted outputs, at two batch sizes and lengths.
    result = export_model(cm, tmp_path / "prefix.pt2", "pt2", example_inputs=inputs)
    assert not result.merged and not cm.merged
    assert result.max_diff is not None and result.max_diff < ATOL
    assert [s["input_ids"] for s in result.checked_shapes] == [(2, 8), (3, 5)]


def test_hf_refuses_biases_the_model_class_cannot_hold(tmp_path):
    model = make_llama(seed=4)
    cm = peftc.compile(model, peftc.BitFit().on(peftc.linear(r".*\.q_proj")), backend="eager").eval()
    with torch.no_grad():
        for p in cm.sites:
            p.state.bias.normal_()
    with pytest.raises(peftc.PeftcError, match=r"biases.*'pt2' or 'onnx'"):
        cm.export(tmp_path / "hf", format="hf", example_inputs=batch(2, 4))
    assert not cm.merged and model.model.layers[0].self_attn.q_proj.bias is None


def test_bad_format_and_bad_target(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    cm = peftc.compile(model, peftc.LoRA(r=2).on(peftc.linear()), example_inputs=(torch.randn(2, 4),),
                       backend="eager")
    with pytest.raises(peftc.PeftcError, match="unknown export format 'zip'.*pt2, onnx, hf"):
        cm.export(tmp_path / "x", format="zip")
    with pytest.raises(peftc.PeftcError, match="needs a transformers model.*'pt2' or 'onnx'"):
        cm.export(tmp_path / "x", format="hf")
    (tmp_path / "file").write_text("")
    with pytest.raises(peftc.PeftcError, match="writes a folder"):
        cm.export(tmp_path / "file", format="hf")
    assert not cm.merged and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_pt2_of_a_plain_module_keeps_static_feature_dims(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    cm = peftc.compile(model, peftc.LoRA(r=2, init=False).on(peftc.linear()),
                       example_inputs=(torch.randn(3, 4),), backend="eager")
    result = export_model(cm, tmp_path / "mlp.pt2", "pt2")  # inputs: the trace cm has
    assert result.inputs == ["input"] and result.outputs == ["output"]
    assert [s["input"] for s in result.checked_shapes] == [(3, 4), (4, 4)]  # batch varies, features don't
    x = torch.randn(5, 4)
    with torch.no_grad():
        (y,) = torch.export.load(result.path).module()(input=x)
        assert float((y - cm(x)).abs().max()) < ATOL
