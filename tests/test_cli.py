"""The ``peftc`` command line, run for real in subprocesses (plus a few in-process calls to
``peftc.cli.main`` for the cheap error and option variants).

The fixtures save a tiny Llama with ``save_pretrained`` (safetensors) and a LoRA
adapter with PEFT's own ``get_peft_model(...).save_pretrained``; PEFT's unmerged
outputs and parameter counts are the reference.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_llama

import peftc
from peftc import cli

ATOL = 1e-4
TARGETS = ["q_proj", "v_proj"]
STAGES = ("load model", "load adapter", "merge", "export", "verify")


def cli_command(*args: str, script: bool = False) -> list[str]:
    """``peftc ARGS``: the installed script, or ``python -m peftc.cli``."""
    if script:
        exe = shutil.which("peftc", path=str(Path(sys.executable).parent))
        assert exe, "the peftc console script is not installed next to the interpreter"
        return [exe, *args]
    return [sys.executable, "-m", "peftc.cli", *args]


def run_cli(*args: str, script: bool = False, timeout: int = 300,
            started: list | None = None) -> subprocess.CompletedProcess:
    """Run ``peftc ARGS`` in a fresh process; ``started`` collects the process (to kill it early)."""
    # One thread each: several of these run side by side (see `runs`).
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = cli_command(*args, script=script)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        if started is not None:
            started.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("peftc: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint, a PEFT LoRA adapter for it, rules files, and PEFT's reference numbers."""
    import peft

    root = tmp_path_factory.mktemp("cli")
    model = make_llama(seed=5)
    model.save_pretrained(root / "model")
    assert (root / "model" / "model.safetensors").is_file()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    pm.save_pretrained(root / "adapter")
    g = torch.Generator().manual_seed(0)
    inputs = []
    for b, n in ((2, 8), (3, 11)):
        ids = torch.randint(1, VOCAB, (b, n), generator=g)
        inputs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with torch.no_grad():
        expected = [pm(**x).logits for x in inputs]
        base = model(**inputs[0]).logits
    assert float((expected[0] - base).abs().max()) > 1e-3  # the adapter matters
    rules = {"rules": [{"adapter": {"kind": "lora", "r": 4, "alpha": 8},
                        "select": {"linear": r".*\.(q|v)_proj"}}]}
    (root / "rules.json").write_text(json.dumps(rules))
    (root / "rules.yaml").write_text(
        "rules:\n  - adapter: {kind: lora, r: 4, alpha: 8}\n    select: {linear: '.*\\.(q|v)_proj'}\n")
    (root / "rules.toml").write_text(
        '[[rules]]\nadapter = {kind = "lora", r = 4, alpha = 8}\nselect = {linear = \'.*\\.(q|v)_proj\'}\n')
    # A checkpoint folder with no weights at all: inspect must not need them.
    (root / "config_only").mkdir()
    shutil.copy(root / "model" / "config.json", root / "config_only" / "config.json")
    return {
        "root": root, "model": root / "model", "adapter": root / "adapter", "inputs": inputs,
        "expected": expected, "counts": pm.get_nb_trainable_parameters(), "config": config,
    }


class Runs:
    """The module's subprocess runs, started together in the background so that they overlap
    with each other and with the in-process tests (each spends seconds importing torch)."""

    # Which runs each test reads: only the selected tests' runs are started.
    USERS = {
        "test_help_of_the_installed_script_and_version": ["help"],
        "test_usage_errors_exit_2": ["usage"],
        "test_missing_model_dir_exits_1": ["missing"],
        "test_inspect_table_on_the_meta_device": ["inspect"],
        "test_merge_to_hf_loads_with_transformers": ["hf"],
        "test_merge_to_pt2": ["pt2"],
        "test_merge_to_onnx": ["onnx"],
    }

    def __init__(self, files, selected: set[str]):
        root, model, adapter = files["root"], str(files["model"]), str(files["adapter"])
        self.out = {"hf": root / "merged-hf", "pt2": root / "merged.pt2", "onnx": root / "merged-onnx"}
        jobs = {  # longest first
            "onnx": (["merge", model, adapter, "--out", str(self.out["onnx"]), "--format", "onnx", "--quiet"], False),
            "pt2": (["merge", model, adapter, "--out", str(self.out["pt2"]), "--format", "pt2", "--no-verify"],
                    False),
            "hf": (["merge", model, adapter, "--out", str(self.out["hf"])], True),
            "inspect": (["inspect", str(root / "config_only"), "--rules", str(root / "rules.json")], False),
            "help": (["--help"], True),
            "usage": (["merge", model], False),
            "missing": (["inspect", str(root / "nope"), "--rules", str(root / "rules.json")], False),
        }
        self.started: list[subprocess.Popen] = []
        self.pool = ThreadPoolExecutor(max_workers=3)
        wanted = {job for test, names in self.USERS.items() if test in selected for job in names}
        self.futures = {name: self.pool.submit(run_cli, *argv, script=script, started=self.started)
                        for name, (argv, script) in jobs.items() if name in wanted}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        return self.futures[name].result()

    def close(self) -> None:
        """Drop the runs no test asked for (when only some tests were selected)."""
        for future in self.futures.values():
            future.cancel()
        for proc in list(self.started):
            if proc.poll() is None:
                proc.kill()
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="module", autouse=True)
def runs(files, request):
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    runs = Runs(files, selected)
    yield runs
    runs.close()


# -- in-process: options, errors, inspect variants (they run while the subprocesses do) ------


@pytest.mark.parametrize(("command", "options"), [
    ("inspect", ["MODEL_DIR", "--rules", "--json"]),
    ("merge", ["MODEL_DIR", "ADAPTER_DIR", "--out", "--format", "hf,pt2,onnx", "--dtype", "--atol", "--force",
               "--no-verify", "--quiet"]),
])
def test_command_help_documents_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, option


def bad_cases(files, tmp_path):
    model, adapter = str(files["model"]), str(files["adapter"])
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(files["adapter"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "nothing.json").write_text(json.dumps(
        {"rules": [{"adapter": {"kind": "lora", "r": 2}, "select": {"linear": r".*\.nonexistent"}}]}))
    return [
        (["merge", str(tmp_path / "nope"), adapter, "--out", str(tmp_path / "o")], "does not exist"),
        (["merge", model, str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "adapter directory"),
        (["merge", model, str(empty), "--out", str(tmp_path / "o")], "no adapter_config.json"),
        (["merge", str(empty), adapter, "--out", str(tmp_path / "o")], "no config.json"),
        (["inspect", model, "--rules", str(tmp_path / "missing.json")], "rules file"),
        (["inspect", model, "--rules", str(tmp_path / "nothing.json")], "matched no site"),
        (["merge", model, str(corrupt), "--out", str(tmp_path / "o"), "-q"], "corrupt"),
    ]


def test_bad_paths_exit_1_with_one_line(files, tmp_path, capsys):
    for argv, needle in bad_cases(files, tmp_path):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("peftc: error:")]
        assert len(lines) == 1 and needle in lines[0], (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_merge_prefix_adapter_to_hf_fails_before_loading(files, tmp_path, capsys):
    folder = tmp_path / "prefix"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}))
    assert cli.main(["merge", str(files["model"]), str(folder), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--format pt2" in err and err.count("\n") == 1


@pytest.mark.parametrize("rules", ["adapter", "rules.toml"])
def test_inspect_json_counts_match_peft(files, rules, capsys):
    path = files["adapter"] / "adapter_config.json" if rules == "adapter" else files["root"] / rules
    assert cli.main(["inspect", str(files["model"]), "--rules", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["trainable_params"], report["all_params"]) == files["counts"]
    assert report["num_sites"] == 4 and report["adapter_params"] == 1024
    assert {s["path"].rsplit(".", 1)[-1] for s in report["sites"]} == set(TARGETS)
    assert report["modules_to_save"] == []


def test_rules_files_in_every_format_say_the_same(files):
    import peftc

    def described(name):
        return [str(r) for r in peftc.load_rules(files["root"] / name).rules]

    assert described("rules.yaml") == described("rules.json") == described("rules.toml")


# -- subprocesses: help, usage, a missing path ----------------------------------------------


def test_help_of_the_installed_script_and_version(runs, capsys):
    proc = runs["help"]
    assert proc.returncode == 0, proc.stderr
    for word in ("inspect", "merge", "--version", "Exit status"):
        assert word in proc.stdout
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"peftc {peftc.__version__}"


def test_usage_errors_exit_2(files, runs, capsys):
    proc = runs["usage"]
    assert proc.returncode == 2
    assert "usage: peftc merge" in proc.stderr and "required" in proc.stderr
    for argv in ([], ["frobnicate"], ["inspect", str(files["model"])],
                 ["merge", str(files["model"]), str(files["adapter"]), "--out", "x", "--format", "zip"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2, argv
        assert "usage:" in capsys.readouterr().err


def test_missing_model_dir_exits_1(runs):
    proc = runs["missing"]
    assert_one_line_error(proc, "model directory", "does not exist")
    assert proc.stdout == ""


# -- subprocesses: inspect and merge -----------------------------------------------------------


def test_inspect_table_on_the_meta_device(files, runs):
    # config_only holds config.json alone: the dry run reads no weights.
    proc = runs["inspect"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "meta device" in out
    header = next(line for line in out.splitlines() if line.startswith("module path"))
    assert header.split() == ["module", "path", "op", "shape", "adapter", "params"]
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    assert [r[0] for r in rows] == [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]
    for r in rows:
        assert r[1] == "aten.linear.default" and r[2:5] == ["32", "->", "32"]
        assert "LoRA(r=4," in " ".join(r) and r[-1] == "256"  # r * (in + out)
    trainable, total = files["counts"]
    assert "matched sites: 4 || adapter params: 1,024" in out
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in out


def check_stages(proc: subprocess.CompletedProcess) -> None:
    for stage in STAGES:
        assert stage in proc.stderr, (stage, proc.stderr[-2000:])


def test_merge_to_hf_loads_with_transformers(files, runs):
    from transformers import LlamaForCausalLM

    proc = runs["hf"]  # the installed script, verifying
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_stages(proc)
    assert "verified against the unmerged model" in proc.stdout
    loaded = LlamaForCausalLM.from_pretrained(runs.out["hf"], local_files_only=True).eval()
    assert not any("lora" in k for k in loaded.state_dict())
    for inputs, expected in zip(files["inputs"], files["expected"], strict=True):
        with torch.no_grad():
            assert float((loaded(**inputs).logits - expected).abs().max()) < ATOL


def test_merge_to_pt2(files, runs):
    proc = runs["pt2"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify" not in proc.stderr and "verified" not in proc.stdout  # --no-verify: checked here
    ep = torch.export.load(runs.out["pt2"])
    for inputs, expected in zip(files["inputs"], files["expected"], strict=True):
        with torch.no_grad():
            (logits,) = ep.module()(**inputs)
        assert float((logits - expected).abs().max()) < ATOL


def test_merge_to_onnx(files, runs):
    ort = pytest.importorskip("onnxruntime")
    proc = runs["onnx"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and "load model" not in proc.stderr  # --quiet
    path = runs.out["onnx"] / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for inputs, expected in zip(files["inputs"], files["expected"], strict=True):
        (logits,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert float((torch.from_numpy(logits) - expected).abs().max()) < ATOL
