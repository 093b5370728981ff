"""How a model stores a weight, and reading and writing it whatever the storage.

A plain weight is its own value. A bitsandbytes 4-bit weight (a ``Params4bit``
in a ``Linear4bit``, as ``quantize=`` or transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` leave it) is a packed byte tensor of
shape ``[out * in / 2, 1]`` plus the quantization state that reads it back
(``quant_state``: block scales ``absmax``, with double quantization the scales'
own 8-bit code, scales and offset). A bitsandbytes 8-bit weight (an
``Int8Params`` in a ``Linear8bitLt``, as ``load_in_8bit=True`` leaves it) is an
``int8`` matrix ``[out, in]`` plus one float scale per row (``SCB``; bitsandbytes
moves it to the layer's ``state`` on the layer's first call, so the weight must
know its layer: :func:`bind`). Everything that needs the weight's value or
shape asks here instead of reading the tensor:

- :func:`bits`: 4, 8, or None for a plain weight;
- :func:`read_as`: the shape and dtype ops see (``[out, in]``, the original dtype);
- :func:`value`: the weight as a float tensor (dequantized);
- :func:`parts`: the tensors that hold it, which an in-place write changes;
- :func:`encoded`: the parts a new float value is stored as (quantized again).

A packed weight is recognised by its ``quant_state``, so this module imports
bitsandbytes only when it has to quantize or dequantize one.
"""

from __future__ import annotations

import torch


def bits(weight) -> int | None:
    """4 for a bitsandbytes 4-bit weight, 8 for an 8-bit one, None for a plain weight."""
    if getattr(weight, "quant_state", None) is not None:
        return 4
    if type(weight).__name__ == "Int8Params" and not weight.has_fp16_weights:
        return 8
    return None


def is_packed(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes quantized weight (4-bit or 8-bit)."""
    return bits(weight) is not None


def bind(weight, module) -> None:
    """Let an 8-bit ``weight`` find its row scales wherever its ``module`` keeps them
    (bitsandbytes' ``Params4bit`` knows its module already; plain weights need nothing)."""
    if bits(weight) == 8:
        weight.module = module


def scales(weight) -> torch.Tensor:
    """An 8-bit weight's row scales (``SCB``): on the weight before its layer first ran, in the
    layer's ``state`` after."""
    if weight.SCB is not None:
        return weight.SCB
    module = getattr(weight, "module", None)
    if module is None or module.state.SCB is None:
        raise RuntimeError("an 8-bit weight's scales are in its layer's state; peftc.storage.bind it first")
    return module.state.SCB


def read_as(weight) -> tuple[torch.Size, torch.dtype]:
    """The shape and dtype ops read ``weight`` as: a 4-bit weight's dequantized matrix, in its
    layer's compute dtype (the dtype it was quantized from when the layer sets none); an 8-bit
    one's as float32 (the dtype bitsandbytes dequantizes it to)."""
    kind = bits(weight)
    if kind == 4:
        state = weight.quant_state
        compute = getattr(getattr(weight, "module", None), "compute_dtype", None)
        return torch.Size(state.shape), compute or state.dtype
    if kind == 8:
        return weight.shape, torch.float32
    return weight.shape, weight.dtype


def value(weight) -> torch.Tensor:
    """``weight``'s value, detached: a quantized weight dequantized by bitsandbytes."""
    kind = bits(weight)
    if kind is None:
        return weight.detach()
    import bitsandbytes.functional as bnb_f

    if kind == 4:
        return bnb_f.dequantize_4bit(weight.data, weight.quant_state)
    return bnb_f.int8_vectorwise_dequant(weight.data, scales(weight))


def parts(weight) -> dict[str, torch.Tensor]:
    """The tensors that hold ``weight``, by role; writing them in place writes the weight.

    A plain weight is one part (``"value"``). A packed weight has ``"packed"`` (its
    bytes) and ``"absmax"`` (block scales: 8-bit codes under double quantization),
    plus, under double quantization, ``"absmax2"``, ``"code2"`` and ``"offset"``
    (the scales of the scales, their code table, and their mean). An 8-bit weight has
    ``"int8"`` (its matrix) and ``"scales"`` (one per row).
    """
    kind = bits(weight)
    if kind is None:
        return {"value": weight.detach()}
    if kind == 8:
        return {"int8": weight.data, "scales": scales(weight)}
    state = weight.quant_state
    out = {"packed": weight.data, "absmax": state.absmax}
    if state.nested:
        out.update(absmax2=state.state2.absmax, code2=state.state2.code, offset=state.offset)
    return out


def encoded(weight, new: torch.Tensor) -> dict[str, torch.Tensor]:
    """The :func:`parts` that store the float value ``new`` in ``weight``'s storage.

    A plain weight takes ``new`` (rounded to its dtype when written). A packed one
    is quantized again with its own settings (block size, type, double quantization,
    storage dtype), as PEFT requantizes a merged 4-bit weight; an 8-bit one row by row
    from float16, as bitsandbytes quantizes an ``Int8Params``.
    """
    kind = bits(weight)
    if kind is None:
        return {"value": new}
    import bitsandbytes.functional as bnb_f

    if kind == 8:
        int8, row_scales, _ = bnb_f.int8_vectorwise_quant(new.to(weight.device, torch.float16).contiguous())
        return {"int8": int8, "scales": row_scales}

    state = weight.quant_state
    packed, fresh = bnb_f.quantize_4bit(new.to(weight.device).contiguous(), blocksize=state.blocksize,
                                        compress_statistics=state.nested, quant_type=state.quant_type,
                                        quant_storage=weight.data.dtype)
    out = {"packed": packed, "absmax": fresh.absmax}
    if fresh.nested:
        out.update(absmax2=fresh.state2.absmax, code2=fresh.state2.code, offset=fresh.offset)
    return out
