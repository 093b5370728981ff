"""PEFT's checkpoint format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (and
``lora_B``); a ``modules_to_save`` copy is ``base_model.model.<module path>.<param>``.
An adapter named ``default`` goes in the directory itself, any other in a
subfolder of that name, as PEFT lays them out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import gathered_tensor, writes_files
from ..errors import PeftcError
from ..peft_config import adapter_config, is_prompt_learning
from .atomic import make_folders, remove_folders, replace_all, write_temporary

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # what PEFT's tensor keys carry in front of module paths


def adapter_tensors(cm, name: str, placements: list | None = None) -> dict[str, torch.Tensor]:
    """Every tensor adapter ``name`` would save, under PEFT's keys (with ``placements``: theirs)."""
    out = {}
    placements = _placements_of(cm, name, placements)
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
    if folder.exists() and not folder.is_dir():
        raise PeftcError(f"{folder} is a file, but an adapter is a folder holding {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME}: pass the folder (here perhaps {folder.parent})")
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


def load_tensors(cm, name: str, tensors: dict[str, torch.Tensor], source: str, placements: list | None = None) -> None:
    """Copy a checkpoint's tensors into adapter ``name``'s state (or into ``placements``', not
    yet installed: a hot-swap), all or nothing.

    Keys are PEFT's. PEFT also saves the base weights of a LoRA-adapted embedding
    (``<path>.base_layer.weight``, for resized vocabularies); those must equal the model's,
    up to rounding.

    Raises:
        PeftcError: naming every missing, unexpected, or wrongly shaped key, or a saved
            base embedding that differs from the model's.
    """
    placements = _placements_of(cm, name, placements)
    expected = adapter_tensors(cm, name, placements)
    found = _without_base_copies(cm, tensors, source, placements)
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


_BASE_COPY = ".base_layer.weight"


def _placements_of(cm, name: str, placements: list | None) -> list:
    return [p for p in cm.sites if p.adapter_name == name] if placements is None else placements


def _without_base_copies(cm, tensors: dict[str, torch.Tensor], source: str,
                         placements: list) -> dict[str, torch.Tensor]:
    """``tensors`` less the base weights PEFT saves beside LoRA on an embedding, checked equal to the model's."""
    keys = {f"{PEFT_KEY_PREFIX}{p.key}{_BASE_COPY}": p.site.weight_path for p in placements
            if p.site.kind == "embedding"}
    for key, weight_path in keys.items():
        if key in tensors:
            weight = cm.base_model.get_parameter(weight_path)
            saved = tensors[key]
            # equal up to rounding: a merge and unmerge before saving leaves the last bits changed
            if saved.shape != weight.shape or not torch.allclose(saved.to(weight.device, weight.dtype),
                                                                 weight.detach(), rtol=1e-5, atol=1e-5):
                raise PeftcError(f"{source} holds base weights for {weight_path} that differ from the model's "
                                 "(a resized or retrained vocabulary?); peftc doesn't replace base weights. "
                                 "Load the model those weights belong to")
    return {k: v for k, v in tensors.items() if k not in keys}


def save_pretrained(cm, directory: str | os.PathLike, adapters: list[str] | None = None,
                    initial: str | os.PathLike | None = None) -> list[Path]:
    """Write each adapter in PEFT's format; return the folders written.

    Arguments:
        initial: PEFT's ``path_initial_model_for_weight_conversion``: the folder a PiSSA or
            OLoRA adapter was saved to before training. The one adapter saved is then
            written as the plain LoRA that gives the same model on the *original* base
            weights (see :func:`as_plain_lora`).

    All or nothing: every file of every adapter is first written to a temporary
    sibling; only when all are complete do they replace the old files, and if
    anything fails on the way (``KeyboardInterrupt`` included) the old files are
    put back and the temporary ones removed. A folder holds its previous
    checkpoint (both files) or the new one, never a mix. (A crash of the process
    itself between two renames can still leave a mix; an exception can't.)

    Raises:
        PeftcError: an unknown adapter name, or a path where a folder must go that is a file.
    """
    root = Path(directory)
    names = list(adapters or cm.adapters)
    for name in names:
        if name not in cm.adapters:
            raise PeftcError(f"no adapter named {name!r}; adapters: {cm.adapters}")
    if initial is not None and len(names) != 1:
        raise PeftcError(f"path_initial_model_for_weight_conversion converts one adapter; pass adapters=[name] "
                         f"(adapters: {names})")
    folders = [root if name == "default" else root / name for name in names]
    for folder in folders:
        for path in (folder, *folder.parents):
            if path.exists() and not path.is_dir():
                raise PeftcError(f"{path} is a file; save_pretrained writes the adapter into a folder there. "
                                 "Pass a folder path (a new one, or an existing adapter folder)")
    contents = []  # everything to write, computed before the disk is touched
    for name, folder in zip(names, folders, strict=True):
        tensors = {k: gathered_tensor(v.detach()).to("cpu").contiguous() for k, v in adapter_tensors(cm, name).items()}
        config = adapter_config(cm, name)
        if initial is not None:
            config, tensors = as_plain_lora(config, tensors, *read_checkpoint(initial), str(initial))
        contents.append((folder, config, tensors))
    if not writes_files():  # sharded: every rank gathered the adapters above; rank 0 writes them
        return []
    made: list[Path] = []
    staged: list[tuple[Path, Path]] = []  # (complete temporary file, the file it replaces)
    try:
        for folder, config, tensors in contents:
            made += make_folders(folder)
            staged.append((write_temporary(folder / WEIGHTS_NAME,
                                            lambda path, t=tensors: save_file(t, path, metadata={"format": "pt"})),
                           folder / WEIGHTS_NAME))
            staged.append((write_temporary(folder / CONFIG_NAME, lambda path, c=config: write_config(path, c)),
                           folder / CONFIG_NAME))
        replace_all(staged)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        remove_folders(made)
        raise
    return folders


def as_plain_lora(config: dict, tensors: dict[str, torch.Tensor], initial_config: dict,
                  initial: dict[str, torch.Tensor], source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PiSSA / OLoRA adapter as a plain LoRA of twice the rank, PEFT's conversion.

    The trained ``(A, B)`` ran on the residual ``W - s B0 A0``; on the original ``W`` the
    same model is ``W + s (B A - B0 A0)``: ``A = [A; A0]``, ``B = [B, -B0]``, with alpha
    scaled so the scaling stays (rank and alpha patterns doubled with them).

    Raises:
        PeftcError: an adapter that isn't PiSSA/OLoRA LoRA, or an initial checkpoint that
            doesn't hold the same sites and ranks.
    """
    if config.get("peft_type") != "LORA" or config.get("init_lora_weights") in (True, False, "gaussian", None):
        raise PeftcError("path_initial_model_for_weight_conversion converts a LoRA adapter with a PiSSA or OLoRA "
                         f"init; this one has peft_type {config.get('peft_type')!r}, init_lora_weights "
                         f"{config.get('init_lora_weights')!r}: save it without the argument")
    out = dict(tensors)
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        key_b = key.removesuffix("lora_A.weight") + "lora_B.weight"
        a0, b0 = initial.get(key), initial.get(key_b)
        if a0 is None or b0 is None or a0.shape != a.shape or b0.shape != tensors[key_b].shape:
            raise PeftcError(f"{source} holds no initial {key} / lora_B of this adapter's shapes: pass the folder "
                             "the adapter was saved to right after it was created, before training")
        out[key] = torch.cat([a, a0.to(a)], 0).contiguous()
        out[key_b] = torch.cat([tensors[key_b], -b0.to(a)], 1).contiguous()
    factor = 2 ** 0.5 if config.get("use_rslora") else 2
    config = {**config, "r": 2 * config["r"], "lora_alpha": factor * config["lora_alpha"], "init_lora_weights": True,
              "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
              "alpha_pattern": {k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()}}
    return config, out


def write_config(path: str | os.PathLike, config: dict) -> None:
    """Write an adapter config as PEFT does (indented JSON)."""
    Path(path).write_text(json.dumps(config, indent=2))
