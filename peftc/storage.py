"""How a model stores a weight, and reading and writing it whatever the storage.

A plain weight is its own value. A bitsandbytes 4-bit weight (a ``Params4bit``
in a ``Linear4bit``, as ``quantize=`` or transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` leave it) is a packed byte tensor of
shape ``[out * in / 2, 1]`` plus the quantization state that reads it back
(``quant_state``: block scales ``absmax``, with double quantization the scales'
own 8-bit code, scales and offset). Everything that needs the weight's value or
shape asks here instead of reading the tensor:

- :func:`read_as`: the shape and dtype ops see (``[out, in]``, the original dtype);
- :func:`value`: the weight as a float tensor (dequantized);
- :func:`parts`: the tensors that hold it, which an in-place write changes;
- :func:`encoded`: the parts a new float value is stored as (quantized again).

A packed weight is recognised by its ``quant_state``, so this module imports
bitsandbytes only when it has to quantize or dequantize one.
"""

from __future__ import annotations

import torch


def is_packed(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit packed weight."""
    return getattr(weight, "quant_state", None) is not None


def read_as(weight) -> tuple[torch.Size, torch.dtype]:
    """The shape and dtype ops read ``weight`` as: a packed weight's dequantized matrix, in its
    layer's compute dtype (the dtype it was quantized from when the layer sets none)."""
    if is_packed(weight):
        state = weight.quant_state
        compute = getattr(getattr(weight, "module", None), "compute_dtype", None)
        return torch.Size(state.shape), compute or state.dtype
    return weight.shape, weight.dtype


def value(weight) -> torch.Tensor:
    """``weight``'s value, detached: a packed weight dequantized by bitsandbytes (in its original dtype)."""
    if is_packed(weight):
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach()


def parts(weight) -> dict[str, torch.Tensor]:
    """The tensors that hold ``weight``, by role; writing them in place writes the weight.

    A plain weight is one part (``"value"``). A packed weight has ``"packed"`` (its
    bytes) and ``"absmax"`` (block scales: 8-bit codes under double quantization),
    plus, under double quantization, ``"absmax2"``, ``"code2"`` and ``"offset"``
    (the scales of the scales, their code table, and their mean).
    """
    if not is_packed(weight):
        return {"value": weight.detach()}
    state = weight.quant_state
    out = {"packed": weight.data, "absmax": state.absmax}
    if state.nested:
        out.update(absmax2=state.state2.absmax, code2=state.state2.code, offset=state.offset)
    return out


def encoded(weight, new: torch.Tensor) -> dict[str, torch.Tensor]:
    """The :func:`parts` that store the float value ``new`` in ``weight``'s storage.

    A plain weight takes ``new`` (rounded to its dtype when written). A packed one
    is quantized again with its own settings (block size, type, double quantization,
    storage dtype), as PEFT requantizes a merged 4-bit weight.
    """
    if not is_packed(weight):
        return {"value": new}
    import bitsandbytes.functional as bnb_f

    state = weight.quant_state
    packed, fresh = bnb_f.quantize_4bit(new.to(weight.device).contiguous(), blocksize=state.blocksize,
                                        compress_statistics=state.nested, quant_type=state.quant_type,
                                        quant_storage=weight.data.dtype)
    out = {"packed": packed, "absmax": fresh.absmax}
    if fresh.nested:
        out.update(absmax2=fresh.state2.absmax, code2=fresh.state2.code, offset=fresh.offset)
    return out
