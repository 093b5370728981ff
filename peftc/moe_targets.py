"""PEFT 0.21's targets on mixture-of-experts models that transformers 5 restructured.

transformers 5 fused the experts of Mixtral- and Qwen2-MoE-style models into 3-D
parameters (``experts.gate_up_proj[E, ...]``, ``experts.down_proj[E, ...]``) and
made the router a module of its own (``mlp.gate``, read by a linear op but not an
``nn.Linear``). So that configs written for transformers 4 keep working, PEFT
renames the old target names of those models into *parameter* targets::

    target_modules ["q_proj", "gate", "w1", "w3", "w2"]        (Mixtral family)
      -> target_modules ["q_proj"]
         target_parameters ["gate.weight", "gate_up_proj", "down_proj"]

``"all-linear"`` and a regex are first resolved to the leaf names they match, plus,
for ``"all-linear"``, every old name. :func:`translate` does the same. A router is a
2-D weight read by a linear op: LoRA on it is LoRA on that linear site, with the
same saved keys. A fused expert weight is a site of its own kind, a stack of experts
(:mod:`peftc.sites`), which LoRA adapts with one pair per expert as PEFT does.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import nn

from .errors import RuleError

# The families whose old names PEFT renames, and how (transformers 4 name -> transformers 5 parameter).
_RENAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
_FUSED = {"gate_up_proj"}  # parameters that fuse two old projections: both or neither must be named


class Targets(NamedTuple):
    """What PEFT adapts after renaming: module names, parameter names (suffixes of parameter
    paths: a router's weight, stacks of experts), and ``{rank/alpha pattern key: factor}``:
    a stack that fuses ``n`` old projections gets ``n`` times the rank and alpha, so that each
    old projection keeps its rank and scaling (PEFT writes these into its ``rank_pattern`` and
    ``alpha_pattern``)."""

    modules: set[str] | list[str] | str
    parameters: set[str]
    widened: dict[str, int]


def family(model: nn.Module | None) -> str | None:
    """The MoE family (``"mixtral"``, ``"qwen2_moe"``) whose names PEFT renames for this
    model, as transformers' own weight-conversion table assigns it; None for other models."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: nothing was restructured
        return None
    base = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(model_type)
    if base not in _RENAMES or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return base


def translate(model: nn.Module | None, targets, all_linear_names: set[str] | None) -> Targets:
    """``target_modules`` as PEFT 0.21 renames them for ``model`` (unchanged for other models).

    Arguments:
        targets: the config's ``target_modules`` (names, or a regex string).
        all_linear_names: when the config said ``"all-linear"``, the module paths it stands for.

    Returns:
        the renamed :class:`Targets`.

    Raises:
        RuleError: one half of a fused pair is named without the other.
    """
    renames = _RENAMES.get(family(model) or "")
    if renames is None:
        return Targets(all_linear_names if all_linear_names is not None else targets, set(), {})
    if all_linear_names is not None:
        names = {path.rsplit(".", 1)[-1] for path in all_linear_names} | set(renames)
    elif isinstance(targets, str):
        names = _regex_names(model, targets, renames)
    else:
        names = set(targets)
    modules, parameters, named = set(), set(), {}
    for name in names:
        old = next((o for o in renames if name == o or name.endswith(f".{o}")), None)
        if old is None:
            modules.add(name)
            continue
        parameters.add(renames[old])
        named.setdefault(renames[old], set()).add(old)
    widened = {}
    for new, olds in named.items():
        wanted = {o for o, n in renames.items() if n == new}
        if new in _FUSED and olds != wanted:
            raise RuleError(f"target_modules names {sorted(olds)} but not {sorted(wanted - olds)}: transformers 5 "
                            f"fused them into {new}, so PEFT (and peftc) can't adapt one without the other")
        if new in _FUSED:
            widened[rf".*\.{re.escape(new)}"] = len(wanted)
    return Targets(modules, parameters, widened)


def _regex_names(model: nn.Module, pattern: str, renames: dict[str, str]) -> set[str]:
    """The leaf names of module and parameter paths ``pattern`` matches in full, plus each
    old name whose reconstructed path (``experts.gate_proj`` for ``experts.gate_up_proj``) it matches."""
    regex = re.compile(pattern)
    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    names = {k.rsplit(".", 1)[-1] for k in keys if regex.fullmatch(k)}
    containers: dict[str, set[str]] = {}
    for key, _ in model.named_parameters():
        container, _, leaf = key.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in renames.items():
        if old not in names and any(regex.fullmatch(f"{c}.{old}") for c in containers.get(new, ())):
            names.add(old)
    return names


def matches_parameter(weight_path: str, parameters: set[str]) -> bool:
    """PEFT's rule for ``target_parameters``: the full name, or a suffix after a dot."""
    return any(weight_path == p or weight_path.endswith(f".{p}") for p in parameters)
