"""Which modules a PEFT config without ``target_modules`` adapts: PEFT 0.21's defaults, as data.

A ``LoraConfig`` that names no ``target_modules`` gets the default of the model's
``config.model_type`` (:data:`LORA`): module-name suffixes, or one regex that must
match a module path in full. For a model type PEFT has no default for, peftc
adapts every linear op inside the model's attention blocks
(:func:`attention_blocks`) and warns that it did; PEFT refuses such a config.

LoHa, LoKr and VeRA default to LoRA's table (VeRA with one exception,
:data:`VERA`); IA3's defaults, with their feed-forward modules, live with its reader.
"""

from __future__ import annotations

from torch import nn

# model_type -> the names (suffixes of module paths) or the regex PEFT 0.21 targets by default.
_QV = ("q_proj", "v_proj")
_QKV_FUSED = ("query_key_value",)
_QUERY_VALUE = ("query", "value")
LORA: dict[str, tuple[str, ...] | str] = {
    # encoder-decoders
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": _QV,
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    # encoders
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "layoutlm": _QUERY_VALUE,
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    # decoders with fused query/key/value projections
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "btlm": ("c_proj", "c_attn"),
    "bloom": _QKV_FUSED,
    "gpt_neox": _QKV_FUSED,
    "chatglm": _QKV_FUSED,
    "falcon": _QKV_FUSED,
    "RefinedWeb": _QKV_FUSED,
    "RefinedWebModel": _QKV_FUSED,
    "mpt": ("Wqkv",),
    "codegen": ("qkv_proj",),
    # decoders with separate projections
    "opt": _QV,
    "gptj": _QV,
    "gpt_neo": _QV,
    "llama": _QV,
    "llama4": _QV,
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "qwen2": _QV,
    "qwen3": _QV,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}


def lora_targets(model: nn.Module | None) -> list[str] | str | None:
    """PEFT's default ``target_modules`` for ``model``'s type; None when PEFT has none."""
    return targets_for("LORA", model)


VERA = {**LORA, "phi": _QV}  # PEFT's VeRA defaults: LoRA's, but only q/v on phi


def targets_for(peft_type: str, model: nn.Module | None) -> list[str] | str | None:
    """PEFT's default ``target_modules`` of a LoRA, LoHa, LoKr or VeRA config for ``model``; None when none."""
    targets = (VERA if peft_type == "VERA" else LORA).get(model_type(model))
    return list(targets) if isinstance(targets, tuple) else targets


def model_type(model: nn.Module | None) -> str | None:
    """``model.config.model_type`` (what PEFT keys its defaults by), or None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def attention_blocks(model: nn.Module) -> dict[str, str]:
    """The model's attention blocks: ``{module path: class name}`` of the outermost modules
    whose class name says ``Attention`` (``LlamaAttention``, ``BertAttention``, ``T5Attention``).

    The name is the one convention every transformers architecture follows; a block
    inside another one (``BertSelfAttention`` in ``BertAttention``) is part of it.
    """
    blocks: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path or "attention" not in type(module).__name__.lower():
            continue
        if not any(path.startswith(outer + ".") for outer in blocks):
            blocks[path] = type(module).__name__
    return blocks
