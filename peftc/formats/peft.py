"""PEFT's checkpoint format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (and
``lora_B``); a ``modules_to_save`` copy is ``base_model.model.<module path>.<param>``.
An adapter named ``default`` goes in the directory itself, any other in a
subfolder of that name, as PEFT lays them out.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.lora import LoRA
from ..adapters.prefix import Prefix
from ..adapters.prompt import Prompt
from ..errors import PeftcError

CONFIG_NAME = "adapter_config.json"
NATIVE = "PEFTC"  # peft_type of peftc's own format, for kinds PEFT can't hold
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_tensors(cm, name: str) -> dict[str, torch.Tensor]:
    """Every tensor adapter ``name`` would save, under PEFT's keys."""
    out = {}
    prompt_learning = False
    for p in cm.sites:
        if p.adapter_name != name:
            continue
        prompt_learning |= isinstance(p.adapter, (Prompt, Prefix))
        out.update(p.adapter.saved_state(p.site, p.state, f"{PREFIX}{p.key}."))
    # PEFT keys a prompt-learning adapter's modules_to_save copies one level up.
    copies = "base_model." if prompt_learning else PREFIX
    for path, clone in cm._saved.get(name, {}).items():
        for pname, tensor in clone.named_parameters():
            out[f"{copies}{path}.{pname}"] = tensor
    return out


def adapter_config(cm, name: str) -> dict:
    """The config dict for adapter ``name``: PEFT's for LoRA, prompt or prefix tuning,
    peftc's own (``peft_type: "PEFTC"``) for anything PEFT can't hold."""
    placements = [p for p in cm.sites if p.adapter_name == name]
    kinds = {type(p.adapter) for p in placements}
    if kinds == {Prompt} or kinds == {Prefix}:
        return _prompt_learning_config(cm, name, kinds.pop())
    if kinds == {LoRA} and len({p.adapter.use_rslora for p in placements}) == 1:
        return lora_config(cm, name)
    return native_config(cm, name)


def native_config(cm, name: str) -> dict:
    """peftc's config: every site with its adapter's arguments (``Adapter.config()``).

    Tensors use the same keys as PEFT's format (``base_model.model.<key>.<state>``).
    Sites found by a pattern can't be found again from a name alone: loading
    such an adapter needs its rules (``from_pretrained(..., rules=...)``).
    """
    options = cm._options.get(name, {})
    return {
        "peft_type": NATIVE,
        "format_version": 1,
        "task_type": options.get("task_type") or _task_type(cm.base_model),
        "bias": options.get("bias", "none"),
        "modules_to_save": options.get("modules_to_save") or None,
        "sites": [{"weight_path": p.site.weight_path, "kind": p.site.kind, "op": p.site.op,
                   "adapter": p.adapter.config()} for p in cm.sites if p.adapter_name == name],
    }


def native_rules(config: dict) -> dict:
    """Rules rebuilding a native config's adapter on the same sites (by weight path)."""
    from ..adapters.base import adapter_from_config
    from ..match import where
    from ..rules import Rule, RuleSet

    if any(site["kind"] == "pattern" for site in config["sites"]):
        raise PeftcError("this adapter sits on pattern-matched sites; pass the rules it was built "
                         "with: from_pretrained(model, dir, rules=[...])")
    groups: dict[str, list[str]] = {}
    for site in config["sites"]:
        groups.setdefault(json.dumps(site["adapter"], sort_keys=True), []).append(site["weight_path"])
    rules = []
    for spec, paths in groups.items():
        try:
            adapter = adapter_from_config(json.loads(spec))
        except PeftcError as e:
            raise PeftcError(f"{e}. A custom kind must be imported before loading an adapter that uses it") from e
        wanted = frozenset(paths)
        rules.append(Rule(where(lambda s, w=wanted: s.weight_path in w, f"saved_sites({len(wanted)})"), adapter))
    return RuleSet(rules, config.get("modules_to_save") or [], config.get("bias", "none"), config.get("task_type"))


def _prompt_learning_config(cm, name: str, kind: type) -> dict:
    placement = next(p for p in cm.sites if p.adapter_name == name)
    spec, config = placement.adapter, getattr(cm.base_model, "config", None)
    out = {
        "peft_type": "PROMPT_TUNING" if kind is Prompt else "PREFIX_TUNING",
        "task_type": cm._options.get(name, {}).get("task_type") or _task_type(cm.base_model),
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "inference_mode": True,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "modules_to_save": cm._options.get(name, {}).get("modules_to_save") or None,
    }
    if kind is Prompt:
        out.update(prompt_tuning_init={"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}[spec.init],
                   prompt_tuning_init_text=spec.text, tokenizer_name_or_path=None,
                   token_dim=placement.state.embedding.shape[1])
    else:
        n, rows, kv_heads, head_dim = placement.state.shape
        out.update(prefix_projection=False, encoder_hidden_size=spec.projection or kv_heads * head_dim,
                   num_layers=rows // 2, token_dim=kv_heads * head_dim, num_attention_heads=kv_heads)
    return out


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, tensors)`` of a PEFT-format adapter folder, safetensors only.

    Raises:
        PeftcError: a missing folder or file, invalid JSON, a pickle-only
            checkpoint, or a corrupt safetensors file.
    """
    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise PeftcError(f"adapter folder {folder} does not exist")
    if not config_path.is_file():
        raise PeftcError(f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftcError(f"{config_path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(config, dict) or "peft_type" not in config:
        raise PeftcError(f"{config_path} has no peft_type; it is not a PEFT adapter config")
    if not weights_path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise PeftcError(f"{folder} holds only adapter_model.bin (pickle); peftc loads safetensors only. "
                             "Re-save it with PEFT's save_pretrained(safe_serialization=True)")
        raise PeftcError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftcError(f"{weights_path} is not a readable safetensors file ({e}); the checkpoint is corrupt") from e
    return config, tensors


def load_tensors(cm, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's tensors into adapter ``name``'s state, all or nothing.

    Keys are PEFT's.

    Raises:
        PeftcError: naming every missing, unexpected, or wrongly shaped key.
    """
    expected = adapter_tensors(cm, name)
    found = tensors
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
             for k in expected if k in found and found[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = [f"the adapter in {source} doesn't fit {type(cm.base_model).__name__}; was it saved for another model?"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise PeftcError("\n".join(lines))
    with torch.no_grad():
        for key, target in expected.items():
            if not isinstance(target, nn.Parameter) and not target.is_leaf:
                raise PeftcError(f"{key} is computed (e.g. a prefix projection) and can't be loaded into")
            target.copy_(found[key])


def lora_config(cm, name: str) -> dict:
    """A PEFT ``LoraConfig`` dict that rebuilds adapter ``name`` on the same sites."""
    placements = [p for p in cm.sites if p.adapter_name == name]
    ranks = Counter(p.state.r for p in placements)
    r = ranks.most_common(1)[0][0] if ranks else 8
    use_rslora = {p.adapter.use_rslora for p in placements} == {True}
    alphas = {p.key: _alpha(p, use_rslora) for p in placements}
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8
    dropouts = {p.adapter.dropout for p in placements}
    if len(dropouts) > 1:
        warnings.warn(f"adapter {name!r} has several dropouts {sorted(dropouts)}; PEFT keeps one: "
                      f"{max(dropouts)}", stacklevel=3)
    options = cm._options.get(name, {})
    return {
        "peft_type": "LORA",
        "task_type": options.get("task_type") or _task_type(cm.base_model),
        "base_model_name_or_path": getattr(getattr(cm.base_model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts, default=0.0),
        "target_modules": sorted(alphas),
        "rank_pattern": {re.escape(k): p.state.r for p in placements
                         if p.state.r != r and (k := p.key)},
        "alpha_pattern": {re.escape(k): a for k, a in alphas.items() if a != alpha},
        "use_rslora": use_rslora,
        "fan_in_fan_out": any(p.site.layout == "in_out" for p in placements),
        "init_lora_weights": True,
        "bias": options.get("bias", "none"),
        "modules_to_save": options.get("modules_to_save") or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "use_dora": False,
        "lora_bias": False,
    }


def _alpha(p, use_rslora: bool) -> float:
    scaling = float(p.state.scaling)
    alpha = scaling * (p.state.r ** 0.5 if use_rslora else p.state.r)
    return int(round(alpha)) if abs(alpha - round(alpha)) < 1e-6 else alpha


def _task_type(model) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def save_pretrained(cm, directory: str | os.PathLike, adapters: list[str] | None = None) -> list[Path]:
    """Write each adapter in PEFT's format; return the folders written.

    Files are written to a temporary name and renamed, so an interrupted save
    never leaves a half-written checkpoint behind.
    """
    root = Path(directory)
    names = adapters or list(cm.peftc.adapters.keys())
    folders = []
    for name in names:
        if name not in cm.peftc.adapters:
            raise PeftcError(f"no adapter named {name!r}; adapters: {list(cm.peftc.adapters.keys())}")
        folder = root if name == "default" else root / name
        folder.mkdir(parents=True, exist_ok=True)
        config = adapter_config(cm, name)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_tensors(cm, name).items()}
        _atomic_write(folder / WEIGHTS_NAME, lambda path, t=tensors: save_file(t, path, metadata={"format": "pt"}))
        _atomic_write(folder / CONFIG_NAME, lambda path, c=config: Path(path).write_text(json.dumps(c, indent=2)))
        folders.append(folder)
    return folders


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
