"""No code runs because a checkpoint or config asks for it.

The fixture plants every way a file can ask for code to run: a tokenizer folder
with ``auto_map`` and a Python module (named by a text-initialised prompt config
with ``tokenizer_kwargs={"trust_remote_code": true}``), pickles that write a
marker file when unpickled (``adapter_model.bin``, ``pytorch_model.bin``), and
model and adapter configs with ``auto_map``. Each planted module and pickle
writes the same marker file; every entry point (``from_pretrained``,
``load_rules``, ``load_adapter``, the CLI's ``inspect`` and ``merge``) must
leave it absent. The plants are live: the last test shows each one does write
the marker when loaded the unsafe way.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import pickle
import shutil
import sys

import pytest
import torch
from conftest import make_llama

import peftc
from peftc import cli

VIRTUAL = 3


class _Payload:
    """Unpickling it writes the marker (what a malicious pickle does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'a').write('pickle\\n')",)


def _evil_module(marker, name: str) -> str:
    """A module that writes the marker on import, and defines the classes ``auto_map`` names."""
    return (f"open({str(marker)!r}, 'a').write('{name}\\n')\n"
            "from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM\n"
            "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
            "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    marker = root / "MARKER"
    # a remote-code tokenizer
    tok = root / "tokenizer"
    tok.mkdir()
    (tok / "evil_tok.py").write_text(_evil_module(marker, "tokenizer"))
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}}))
    # a model checkpoint whose config names remote code, with a pickle beside its safetensors
    model_dir = root / "model"
    make_llama(seed=3).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil_model.py").write_text(_evil_module(marker, "model"))
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    pickle_only = root / "model_pickle_only"
    pickle_only.mkdir()
    shutil.copy(model_dir / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    # a text-initialised prompt adapter naming that tokenizer, trust_remote_code asked for,
    # auto_map in its config, a pickle beside its safetensors
    cm = peftc.compile(make_llama(seed=3), [peftc.Prompt(VIRTUAL)], backend="eager")
    adapter = root / "adapter"
    cm.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello there", tokenizer_name_or_path=str(tok),
                  tokenizer_kwargs={"trust_remote_code": True},
                  auto_mapping={"base_model_class": "EvilModel", "parent_library": "evil_model"},
                  auto_map={"AutoModel": "evil_model.EvilModel"})
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    pickle_adapter = root / "adapter_pickle_only"
    pickle_adapter.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickle_adapter / "adapter_config.json")
    (pickle_adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    saved = {k: v.clone() for k, v in cm.state_dict().items() if "peftc" in k}
    return {"root": root, "marker": marker, "tokenizer": tok, "model": model_dir, "pickle_only": pickle_only,
            "adapter": adapter, "pickle_adapter": pickle_adapter, "saved": saved}


@pytest.fixture
def marker(planted):
    yield planted["marker"]
    assert not planted["marker"].exists(), planted["marker"].read_text()
    assert not [m for m in sys.modules if "evil_" in m]


def test_from_pretrained_loads_the_weights_and_runs_nothing(planted, marker):
    cm = peftc.from_pretrained(make_llama(seed=3), planted["adapter"], backend="eager")
    got = {k: v for k, v in cm.state_dict().items() if "peftc" in k}
    assert got.keys() == planted["saved"].keys()
    assert all(torch.equal(got[k], v) for k, v in planted["saved"].items())
    with pytest.raises(peftc.PeftcError, match="pickle"):
        peftc.from_pretrained(make_llama(seed=3), planted["pickle_adapter"], backend="eager")


def test_load_adapter_runs_nothing(planted, marker):
    cm = peftc.compile(make_llama(seed=3), [peftc.LoRA(r=2).on(peftc.linear(r".*\.q_proj"))], backend="eager")
    cm.load_adapter(planted["adapter"], "planted")
    assert "planted" in cm.adapters
    with pytest.raises(peftc.PeftcError, match="pickle"):
        cm.load_adapter(planted["pickle_adapter"], "pickled")
    assert cm.adapters == ["default", "planted"]


def test_load_rules_never_trusts_the_tokenizer_code(planted, marker):
    """load_rules builds a fresh adapter, so its TEXT init needs the tokenizer: the remote-code
    one is refused (transformers won't run it without trust_remote_code, which a config can't set)."""
    with pytest.warns(UserWarning, match="trust_remote_code"), pytest.raises(peftc.PeftcError, match="tokenizer"):
        peftc.load_rules(planted["adapter"], make_llama(seed=3))


def test_cli_inspect_runs_nothing(planted, marker, capsys):
    assert cli.main(["inspect", str(planted["model"]), "--rules", str(planted["adapter"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter_params"] == VIRTUAL * 32


def test_cli_merge_runs_nothing(planted, marker, tmp_path, capsys):
    out = tmp_path / "out.pt2"
    assert cli.main(["merge", str(planted["model"]), str(planted["adapter"]), "--out", str(out),
                     "--format", "pt2", "--no-verify", "-q"]) == 0, capsys.readouterr().err
    assert out.is_file()
    assert cli.main(["merge", str(planted["pickle_only"]), str(planted["adapter"]), "--out",
                     str(tmp_path / "o.pt2"), "--format", "pt2", "-q"]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert cli.main(["merge", str(planted["model"]), str(planted["pickle_adapter"]), "--out",
                     str(tmp_path / "o.pt2"), "--format", "pt2", "-q"]) == 1
    assert "pickle" in capsys.readouterr().err
    assert not (tmp_path / "o.pt2").exists()


def test_the_plants_are_live(planted):
    """Loaded the unsafe way, each plant writes the marker: the tests above could fail."""
    import transformers

    marker = planted["marker"]
    try:
        pickle.loads((planted["adapter"] / "adapter_model.bin").read_bytes())
        assert marker.read_text() == "pickle\n"
        with contextlib.suppress(Exception):  # the module is imported before the (dummy) class fails
            transformers.AutoTokenizer.from_pretrained(planted["tokenizer"], trust_remote_code=True)
        assert "tokenizer" in marker.read_text()
        with contextlib.suppress(Exception):
            transformers.AutoConfig.from_pretrained(planted["model"], trust_remote_code=True)
        assert "model" in marker.read_text()
    finally:
        marker.unlink(missing_ok=True)
        for name in [m for m in sys.modules if "evil_" in m]:
            del sys.modules[name]
