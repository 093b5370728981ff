"""The entry points: :func:`compile` and :func:`from_pretrained`.

Both hand over to :class:`~peftc.compiled.CompiledModel`, which traces the
model, matches the rules and builds the adapters' state.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn

from .compiled import CompiledModel
from .errors import PeftcError, RuleError
from .formats.peft import load_tensors, read_checkpoint
from .peft_config import peft_type, supported_peft_types
from .rules import load_rules


def compile(
    model: nn.Module,
    rules,
    example_inputs=None,
    *,
    backend: str | Callable | None = "inductor",
    adapter_name: str = "default",
    modules_to_save: list[str] | None = None,
) -> CompiledModel:
    """Put adapters on ``model`` where ``rules`` say, and lower the result.

    Arguments:
        model: a transformers model or any ``nn.Module``. Its weights are
            shared, never copied; its parameters are frozen (``requires_grad=False``)
            except for biases PEFT's ``bias`` option names.
        rules: Rules (``peftc.LoRA(r=8).on(peftc.linear(...))``), a rules dict
            or file, or a PEFT config (see :func:`peftc.load_rules`).
        example_inputs: a dict of keyword arguments, a tuple, or a tensor. For
            a transformers text model it may be omitted.
        backend: a ``torch.compile`` backend name or callable; ``"eager"`` skips compilation.
        adapter_name: the name of this adapter (PEFT's ``"default"``); it is active.
        modules_to_save: module-name suffixes to train in full (added to the rules').

    Returns:
        A :class:`~peftc.CompiledModel`.

    Raises:
        RuleError: bad rules, or rules that match nothing or conflict.
        TraceError: the model could not be traced with ``example_inputs``.
        Nothing about ``model`` changes when an error is raised.
    """
    return CompiledModel(model, rules, example_inputs, backend=backend, adapter_name=adapter_name,
                         modules_to_save=modules_to_save)


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
    if peft_type(config) not in supported_peft_types():
        raise PeftcError(f"{adapter_dir}: unknown peft_type {config.get('peft_type')!r}; "
                         f"peftc loads {', '.join(supported_peft_types())}")
    if rules is None:
        rules = config
        if peft_type(config) == "PREFIX_TUNING":  # the saved table is already projected
            rules = {**config, "prefix_projection": False}
    rules = load_rules(rules, model)  # a config peftc can't read is reported as such, not as a misfit
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        cm = CompiledModel(model, rules, example_inputs, adapter_name=adapter_name, trainable=is_trainable,
                           **compile_kwargs)
        load_tensors(cm, adapter_name, tensors, str(adapter_dir))
    except RuleError as e:
        _restore(model, flags)
        raise PeftcError(f"the adapter in {adapter_dir} doesn't fit {type(model).__name__}: {e}") from e
    except BaseException:
        _restore(model, flags)
        raise
    if not is_trainable:
        cm.eval()
    return cm


def _restore(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
