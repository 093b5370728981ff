"""Fault injection: a save, an export or the CLI's ``merge`` failing at any point leaves the
files at the target and the model's weights as they were, and no partial files.

Each test writes a good artifact first, changes the adapter (so a new write would differ),
then makes the next write fail: the writer writes some bytes and raises ``ENOSPC``, the
target folder refuses writes (read-only), the free space is short (``.pt2``), or the new
artifact fails verification. Afterwards every file under the test's folder is byte for
byte what it was, and the model's weights and adapter state are what they were.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

import pytest
import torch
from conftest import VOCAB, make_llama

import peftc
from peftc import cli
from peftc.formats import atomic
from peftc.formats import peft as peft_format

FORMATS = ("pt2", "onnx", "hf")
TARGET = {"pt2": "model.pt2", "onnx": "onnx", "hf": "hf"}  # onnx: a folder path gets model.onnx inside


def _tree(root) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too), by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _state(cm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cm.state_dict().items()}


def _assert_state(cm, before: dict) -> None:
    """Adapter tensors bit for bit; base weights within merge/unmerge rounding (1e-6)."""
    after = _state(cm)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if "peftc" in k:
            assert torch.equal(after[k], v), k
        else:
            torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0, msg=k)
    assert not cm.merged


def _full_disk_after(n: int, calls: list):
    """A writer that writes ``n`` bytes to its destination, then fails as a full disk does."""
    def write(path):
        calls.append(str(path))
        with open(path, "wb") as f:
            f.write(b"\0" * n)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return write


def _break_writer(monkeypatch, fmt: str, n: int) -> list:
    """Make format ``fmt``'s file writer write ``n`` bytes, then raise ENOSPC."""
    calls: list = []
    fail = _full_disk_after(n, calls)
    if fmt == "pt2":
        monkeypatch.setattr(torch.export, "save", lambda ep, f, **kw: fail(f))
    elif fmt == "onnx":
        monkeypatch.setattr(torch.onnx.ONNXProgram, "save", lambda self, destination, **kw: fail(destination))
    else:  # the weights file, after save_pretrained has written config.json
        import transformers.modeling_utils as modeling_utils

        monkeypatch.setattr(modeling_utils, "safe_save_file", lambda tensors, path, **kw: fail(path))
    return calls


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA Llama exported once to each format, then its adapter changed."""
    root = tmp_path_factory.mktemp("exports")
    cm = peftc.compile(make_llama(seed=1), peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.(q|v)_proj")),
                       backend="eager")
    paths = {fmt: cm.export(root / TARGET[fmt], fmt, verify=False) for fmt in FORMATS}
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_B.add_(0.5)
    return cm, root, paths


@pytest.mark.parametrize(("fmt", "n"), [("pt2", 0), ("pt2", 4096), ("onnx", 4096), ("hf", 4096)])
def test_an_export_failing_partway_keeps_the_old_artifact(exported, monkeypatch, fmt, n):
    cm, root, paths = exported
    files, state = _tree(root), _state(cm)
    calls = _break_writer(monkeypatch, fmt, n)
    with pytest.raises((OSError, peftc.PeftcError), match="No space left"):
        cm.export(root / TARGET[fmt], fmt, verify=False)
    assert len(calls) == 1 and calls[0].startswith(str(root))
    assert _tree(root) == files
    _assert_state(cm, state)


def test_an_export_failing_verification_is_not_published(exported):
    cm, root, paths = exported
    files, state = _tree(root), _state(cm)
    with pytest.raises(peftc.PeftcError, match=f"the exported pt2 at {paths['pt2']} differs"):
        cm.export(paths["pt2"], "pt2", atol=-1.0, rtol=0.0)  # no artifact passes a negative tolerance
    assert _tree(root) == files
    _assert_state(cm, state)


@pytest.mark.parametrize("fmt", ["pt2", "hf"])
def test_an_export_into_a_read_only_folder(exported, monkeypatch, fmt):
    """A read-only folder refuses the staging folder (simulated: the tests run as root)."""
    cm, root, paths = exported
    files, state = _tree(root), _state(cm)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(peftc.PeftcError, match=f"can't write into {root}.*Read-only"):
        cm.export(root / TARGET[fmt], fmt, verify=False)
    assert _tree(root) == files
    _assert_state(cm, state)


def test_a_first_export_failing_leaves_nothing(exported, monkeypatch, tmp_path):
    cm, _, _ = exported
    _break_writer(monkeypatch, "pt2", 100)
    with pytest.raises(OSError, match="No space left"):
        cm.export(tmp_path / "new" / "deeper" / "model.pt2", "pt2", verify=False)
    assert list(tmp_path.iterdir()) == []


def test_pt2_space_check_names_needed_and_available(exported, monkeypatch, tmp_path):
    """The estimate covers the real archive: a disk with one byte less than the file written
    with plenty of space is refused, before torch's writer runs."""
    cm, _, paths = exported
    size = paths["pt2"].stat().st_size
    written = []
    real_save = torch.export.save
    monkeypatch.setattr(torch.export, "save", lambda *a, **k: (written.append(a[1]), real_save(*a, **k)))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    with pytest.raises(peftc.PeftcError, match=r"needs about [\d.]+ MiB, .* has [\d.]+ (KiB|MiB) free"):
        cm.export(tmp_path / "model.pt2", "pt2", verify=False)
    assert written == [] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage._replace(free=100 << 30))
    cm.export(tmp_path / "model.pt2", "pt2", verify=False)
    assert len(written) == 1 and (tmp_path / "model.pt2").is_file()


def test_an_hf_export_over_an_old_one_keeps_other_files_and_drops_old_shards(exported, tmp_path):
    from transformers import LlamaForCausalLM

    cm, root, paths = exported
    folder = tmp_path / "hf"
    shutil.copytree(paths["hf"], folder)
    (folder / "notes.txt").write_text("mine")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"an old shard")
    (folder / "model.safetensors.index.json").write_text("{}")
    cm.export(folder, "hf")
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json",
                                                         "model.safetensors", "notes.txt"]
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    loaded = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, cm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


# -- save_pretrained -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    cm = peftc.compile(make_llama(), peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.q_proj")), backend="eager")
    cm.add_adapter("b", peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.k_proj")))
    cm.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in cm.sites:
            p.state.lora_B.add_(1.0)
    return cm, tmp_path


@pytest.mark.parametrize("n", [0, 100, 10_000])
def test_a_save_failing_after_n_bytes(saved, monkeypatch, n):
    cm, folder = saved
    files, state = _tree(folder), _state(cm)
    calls: list = []
    fail, real = _full_disk_after(n, calls), peft_format.save_file

    def save_file(tensors, path, **kwargs):  # the first adapter's weights write fine, the second's fail
        if calls:
            return fail(path)
        calls.append(path)
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(peft_format, "save_file", save_file)
    with pytest.raises(OSError, match="No space left"):
        cm.save_pretrained(folder)
    assert len(calls) == 2
    assert _tree(folder) == files
    _assert_state(cm, state)


def test_a_save_into_a_read_only_folder(saved, monkeypatch):
    cm, folder = saved
    files, state = _tree(folder), _state(cm)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(peftc.PeftcError, match=f"can't write into {folder}.*Read-only"):
        cm.save_pretrained(folder)
    assert _tree(folder) == files
    _assert_state(cm, state)


# -- the CLI's merge -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_llama(seed=2).save_pretrained(root / "model")
    (root / "model" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    cm = peftc.compile(make_llama(seed=2), peftc.LoRA(r=2, init=False).on(peftc.linear(r".*\.v_proj")),
                       backend="eager")
    cm.save_pretrained(root / "adapter")
    return root


def _merge(checkpoint, out, *options):
    return cli.main(["merge", str(checkpoint / "model"), str(checkpoint / "adapter"), "--out", str(out),
                     "-q", *options])


def test_cli_merge_refuses_an_existing_out_without_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("old")
    assert _merge(checkpoint, out, "--no-verify") == 1
    assert "--force" in capsys.readouterr().err
    assert _tree(tmp_path) == {"merged/config.json": b"old"}
    assert _merge(checkpoint, out, "--force") == 0
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert (out / "config.json").read_text() != "old"


@pytest.mark.parametrize("fmt", ["hf", "pt2"])
def test_cli_merge_failing_partway_keeps_the_old_out(checkpoint, tmp_path, monkeypatch, capsys, fmt):
    out = tmp_path / ("merged" if fmt == "hf" else "merged.pt2")
    assert _merge(checkpoint, out, "--format", fmt, "--no-verify") == 0
    files = _tree(tmp_path)
    calls = _break_writer(monkeypatch, fmt, 1000)
    assert _merge(checkpoint, out, "--format", fmt, "--no-verify", "--force") == 1
    assert "No space left" in capsys.readouterr().err
    assert len(calls) == 1
    assert _tree(tmp_path) == files


def test_cli_merge_failing_while_copying_the_tokenizer_leaves_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    def copy2(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(cli.shutil, "copy2", copy2)
    assert _merge(checkpoint, tmp_path / "merged", "--no-verify") == 1
    assert "No space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert not [p for p in os.listdir(checkpoint) if p.startswith(".")]
