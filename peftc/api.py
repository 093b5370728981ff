"""The entry points: :func:`compile` and :func:`from_pretrained`, and PEFT's names for them.

All hand over to :class:`~peftc.compiled.CompiledModel`, which traces the
model, matches the rules and builds the adapters' state. A PEFT user migrates
by changing an import: ``get_peft_model``, ``PeftModel.from_pretrained`` and
the ``AutoPeftModelFor...`` classes take PEFT's arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .compiled import CompiledModel
from .errors import PeftcError
from .formats.peft import CONFIG_NAME, read_checkpoint
from .state import Reserve


def compile(
    model: nn.Module,
    rules,
    example_inputs=None,
    *,
    backend: str | Callable | None = "inductor",
    adapter_name: str = "default",
    modules_to_save: list[str] | None = None,
    quantize=None,
    reserve: Reserve | None = None,
    optimize=None,
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
        quantize: store the frozen linear weights in 4 bits with bitsandbytes (QLoRA):
            ``"nf4"``, ``"fp4"``, :class:`peftc.Quantize` or ``BitsAndBytesConfig(load_in_4bit=True)``.
            The model's ``nn.Linear`` modules become bitsandbytes ``Linear4bit`` in place,
            one at a time, after every check has passed. A model already quantized by
            transformers (4-bit) needs no ``quantize``.
        reserve: room for adapters to come (:class:`peftc.Reserve`: a maximum LoRA rank and a
            number of adapter slots), so that adding, loading, hot-swapping, switching and
            deleting LoRA adapters later compile nothing again (PEFT's
            ``prepare_model_for_compiled_hotswap``). The first adapter's sites are the room.
        optimize: a :class:`peftc.Optimize` choosing the optimisation passes (default:
            ``Optimize()``: the fused LM-head loss in training graphs). With the fused loss, a
            training-mode call given ``labels`` returns ``logits=None``; pass
            ``Optimize(fused_loss=False)`` to read them.

    Returns:
        A :class:`~peftc.CompiledModel`.

    Raises:
        RuleError: bad rules, or rules that match nothing or conflict.
        TraceError: the model could not be traced with ``example_inputs``.
        QuantizationError: a ``quantize`` spec bitsandbytes can't run, or a selected weight it can't hold.
        Nothing about ``model`` changes when an error is raised.
    """
    return CompiledModel(model, rules, example_inputs, backend=backend, adapter_name=adapter_name,
                         modules_to_save=modules_to_save, quantize=quantize, reserve=reserve,
                         optimize=optimize)


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
    return CompiledModel.from_pretrained(model, adapter_dir, example_inputs, is_trainable, adapter_name, rules,
                                         **compile_kwargs)


def hotswap_adapter(cm: CompiledModel, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                    is_trainable: bool = False) -> None:
    """PEFT's ``hotswap_adapter``: replace adapter ``adapter_name``'s weights and scaling by a saved
    adapter's, in place, compiling nothing again. ``cm.load_adapter(adapter_dir, adapter_name,
    hotswap=True)``; see there for what fits.
    """
    cm.load_adapter(adapter_dir, adapter_name, is_trainable=is_trainable, hotswap=True)


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default", **compile_options) -> CompiledModel:
    """PEFT's ``get_peft_model``: :func:`compile` with a PEFT config (object, dict or file).

    ``compile_options`` are :func:`compile`'s (``example_inputs``, ``backend``, ...).
    """
    return compile(model, peft_config, adapter_name=adapter_name, **compile_options)


# The transformers auto class that builds the base model, by PEFT task type.
_AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                 "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


class AutoPeftModel:
    """PEFT's ``AutoPeftModel``: load the base model an adapter names, then the adapter.

    ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads
    ``base_model_name_or_path`` from the adapter's config, builds the base with
    transformers' matching auto class (``AutoModelForCausalLM``), and returns
    :func:`from_pretrained` of the adapter on it. ``AutoPeftModel`` itself picks
    the class from the config's ``task_type``.
    """

    task_type: str | None = None

    @classmethod
    def from_pretrained(cls, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, example_inputs=None, backend="inductor",
                        **model_kwargs) -> CompiledModel:
        """Arguments:
            model_kwargs: for the base model's ``from_pretrained`` (``dtype=...``, ``local_files_only=True``).
        """
        import transformers

        config, _ = read_checkpoint(adapter_dir)  # the whole checkpoint checked before the base loads
        saved = str(config.get("task_type") or "").rsplit(".", 1)[-1].upper() or None
        task = cls.task_type or saved
        if task not in _AUTO_CLASSES or (saved is not None and saved != task):
            raise PeftcError(f"{Path(adapter_dir) / CONFIG_NAME} has task_type {config.get('task_type')!r}, and "
                             f"{cls.__name__} loads {task}; use the AutoPeftModelFor... class of the adapter's task")
        base = config.get("base_model_name_or_path")
        if not base:
            raise PeftcError(f"{Path(adapter_dir) / CONFIG_NAME} names no base_model_name_or_path; load the base "
                             "model yourself and call peftc.from_pretrained(model, adapter_dir)")
        model = getattr(transformers, _AUTO_CLASSES[task]).from_pretrained(base, **model_kwargs)
        return from_pretrained(model, adapter_dir, example_inputs, is_trainable, adapter_name, backend=backend)


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = "CAUSAL_LM"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = "SEQ_CLS"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = "FEATURE_EXTRACTION"
