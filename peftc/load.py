"""``peftc.from_pretrained``: a PEFT-format adapter folder onto a model."""

from __future__ import annotations

import os

from torch import nn

from .compile import compile
from .errors import PeftcError, RuleError
from .formats.peft import NATIVE, load_tensors, native_rules, read_checkpoint
from .program import CompiledModel

_KNOWN = ("LORA", "PROMPT_TUNING", "PREFIX_TUNING", NATIVE)


def from_pretrained(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    example_inputs=None,
    is_trainable: bool = False,
    adapter_name: str = "default",
    rules=None,
    **compile_kwargs,
) -> CompiledModel:
    """Load an adapter saved by PEFT or by peftc.

    PEFT's format holds LoRA, prompt and prefix tuning; peftc's own
    (``peft_type: "PEFTC"``) holds any adapter kind, BitFit and custom kinds
    included (import a custom kind's module first).

    Arguments:
        model: the base model the adapter was trained on.
        adapter_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        example_inputs, **compile_kwargs: as for :func:`peftc.compile` (``backend=...``).
        is_trainable: leave the adapter trainable; by default it is frozen and
            the result is in eval mode, as PEFT does.
        adapter_name: the name to load it under.
        rules: the rules the adapter was built with; needed only for adapters on
            pattern-matched sites, which can't be found again from names.

    Raises:
        PeftcError: a missing or corrupt file, an unknown ``peft_type``, or a
            checkpoint for another model (naming the keys and shapes that don't
            fit). The model is left as it was.
    """
    config, tensors = read_checkpoint(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in _KNOWN:
        raise PeftcError(f"{adapter_dir}: unknown peft_type {config.get('peft_type')!r}; "
                         f"peftc loads {', '.join(_KNOWN)}")
    if rules is not None:
        config = rules
    elif peft_type == NATIVE:
        config = native_rules(config)
    elif peft_type == "PREFIX_TUNING":
        config = {**config, "prefix_projection": False}  # the saved table is already projected
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        cm = compile(model, config, example_inputs, adapter_name=adapter_name, **compile_kwargs)
        load_tensors(cm, adapter_name, tensors, str(adapter_dir))
    except RuleError as e:
        _restore(model, flags)
        raise PeftcError(f"the adapter in {adapter_dir} doesn't fit {type(model).__name__}: {e}") from e
    except BaseException:
        _restore(model, flags)
        raise
    cm._trainable[adapter_name] = is_trainable
    cm._update_trainability()
    if not is_trainable:
        cm.eval()
    return cm


def _restore(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
