"""PEFT's checkpoint format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (and
``lora_B``); a ``modules_to_save`` copy is ``base_model.model.<module path>.<param>``.
An adapter named ``default`` goes in the directory itself, any other in a
subfolder of that name, as PEFT lays them out.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import PeftcError
from ..peft_config import adapter_config, is_prompt_learning

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # what PEFT's tensor keys carry in front of module paths


def adapter_tensors(cm, name: str) -> dict[str, torch.Tensor]:
    """Every tensor adapter ``name`` would save, under PEFT's keys."""
    out = {}
    placements = [p for p in cm.sites if p.adapter_name == name]
    for p in placements:
        out.update(p.adapter.saved_state(p.site, p.state, f"{PEFT_KEY_PREFIX}{p.key}."))
    # PEFT keys a prompt-learning adapter's modules_to_save copies one level up.
    copies = "base_model." if is_prompt_learning(placements) else PEFT_KEY_PREFIX
    for path, clone in cm.saved_modules(name).items():
        for pname, tensor in clone.named_parameters():
            out[f"{copies}{path}.{pname}"] = tensor
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


def save_pretrained(cm, directory: str | os.PathLike, adapters: list[str] | None = None) -> list[Path]:
    """Write each adapter in PEFT's format; return the folders written.

    Files are written to a temporary name and renamed, so an interrupted save
    never leaves a half-written checkpoint behind.
    """
    root = Path(directory)
    names = adapters or cm.adapters
    folders = []
    for name in names:
        if name not in cm.adapters:
            raise PeftcError(f"no adapter named {name!r}; adapters: {cm.adapters}")
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
