"""QLoRA's frozen base: the quantize spec, 4-bit linears in the user's model, and tracing through them.

The quantized weights live in the user's model, as bitsandbytes ``Linear4bit``
modules: exactly what transformers' ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` builds. So a
model quantized by ``peftc.compile(..., quantize="nf4")`` and one quantized by
transformers are the same thing to peftc: the model still runs on its own,
its ``state_dict`` is bitsandbytes' (and transformers') serialisation, moving
it moves the packed weights and their scales together, and PEFT's
``get_peft_model`` accepts it as it is. (Holding the packed weights elsewhere,
in peftc's state or as bare ``Params4bit`` in ``nn.Linear``, would leave a
model that can't run, save or move on its own.)

``torch.export`` can't trace a ``Params4bit``; :func:`float_view` shows each
``Linear4bit`` to export as the float linear it stands for, and points the
exported program back at the packed weight. The graph pass
:mod:`peftc.passes.quantize` then reads the packed storage with bitsandbytes'
kernels. bitsandbytes is imported only when a model is quantized.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import PeftcError, QuantizationError, RuleError, first_line
from .match import Selector
from .quiet import hide_progress
from .sites import input_embeddings_of
from .storage import bind, bits, is_packed, read_as, value

if TYPE_CHECKING:
    from .sites import Site

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels take
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Quantize:
    """Store the frozen linear weights in 4 bits (bitsandbytes), as QLoRA does.

    Arguments:
        quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
        double_quant: quantize the block scales too (QLoRA's double quantization).
        compute_dtype: the dtype the dequantized weight is multiplied in (None: the
            input's, as bitsandbytes does).
        blocksize: values per scale: 32 to 4096, a power of two.
        select: which linears to quantize (a :class:`peftc.Selector`); None picks
            PEFT's and transformers' default: every ``nn.Linear`` but the output head.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    blocksize: int = 64
    select: Selector | None = None

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise QuantizationError(f"quant_type={self.quant_type!r}: bitsandbytes' 4-bit storage is one of "
                                    f"{QUANT_TYPES}; use quantize='nf4'")
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise QuantizationError(f"blocksize={self.blocksize!r}: bitsandbytes' 4-bit kernels take "
                                    f"{BLOCKSIZES}; use 64 (the default)")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise QuantizationError(f"compute_dtype={self.compute_dtype!r}: use one of "
                                    f"{[str(d).removeprefix('torch.') for d in COMPUTE_DTYPES]} or None")


def quantize_spec(spec: Any) -> Quantize | None:
    """A :class:`Quantize` from what ``compile(quantize=...)`` and rule files take.

    Arguments:
        spec: None, a :class:`Quantize`, ``"nf4"`` / ``"fp4"``, a dict of
            :class:`Quantize`'s arguments (``compute_dtype`` by name, ``select`` as a
            rules-file selector), or transformers' ``BitsAndBytesConfig`` with
            ``load_in_4bit=True`` (its ``llm_int8_skip_modules``, if any, are left unquantized).

    Raises:
        QuantizationError: a spec bitsandbytes can't run, or an 8-bit config.
    """
    if spec is None or isinstance(spec, Quantize):
        return spec
    if isinstance(spec, str):
        return Quantize(quant_type=spec)
    if isinstance(spec, dict):
        data = dict(spec)
        unknown = set(data) - {"quant_type", "double_quant", "compute_dtype", "blocksize", "select"}
        if unknown:
            raise QuantizationError(f"unknown quantize options {sorted(unknown)}; options: quant_type, "
                                    "double_quant, compute_dtype, blocksize, select")
        if isinstance(data.get("compute_dtype"), str):
            data["compute_dtype"] = _dtype(data["compute_dtype"])
        if data.get("select") is not None and not isinstance(data["select"], Selector):
            raise QuantizationError(f"quantize select={data['select']!r} must be a peftc selector")
        return Quantize(**data)
    if type(spec).__name__ == "BitsAndBytesConfig":
        return _from_bnb_config(spec)
    raise QuantizationError(f"quantize={spec!r}: pass 'nf4', 'fp4', peftc.Quantize(...), a dict of its "
                            "options, or transformers.BitsAndBytesConfig(load_in_4bit=True, ...)")


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise QuantizationError(f"compute_dtype={name!r}: use one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


def _from_bnb_config(config) -> Quantize:
    if getattr(config, "load_in_8bit", False) or not getattr(config, "load_in_4bit", False):
        raise QuantizationError(
            "quantize= stores weights in 4 bits; this BitsAndBytesConfig has load_in_4bit=False. Pass "
            "BitsAndBytesConfig(load_in_4bit=True, ...), or load an 8-bit model with transformers' "
            "from_pretrained(..., quantization_config=...) and compile that"
        )
    if config.bnb_4bit_quant_storage not in (torch.uint8, "uint8"):
        raise QuantizationError(f"bnb_4bit_quant_storage={config.bnb_4bit_quant_storage}: peftc packs weights "
                                "in uint8 (the default); leave it unset")
    select = DefaultLinears(config.llm_int8_skip_modules) if config.llm_int8_skip_modules else None
    compute = config.bnb_4bit_compute_dtype
    return Quantize(config.bnb_4bit_quant_type, bool(config.bnb_4bit_use_double_quant),
                    _dtype(compute) if isinstance(compute, str) else compute, 64, select)


class DefaultLinears(Selector):
    """Every linear op's ``weight`` read by ``aten.linear`` (``nn.Linear``); :func:`plan` leaves
    out the output head and weights tied to the input embeddings.

    Arguments:
        skip: module names left out too, matched as transformers matches
            ``llm_int8_skip_modules``: a whole dotted part of the path.
    """

    def __init__(self, skip: list[str] | None = None):
        self.skip = list(skip or [])
        names = "|".join(re.escape(name) for name in self.skip)
        self._skip = re.compile(rf"(.*\.)?({names})(\..*)?") if self.skip else None

    def __call__(self, site) -> bool:
        if self._skip is not None and self._skip.fullmatch(site.path):
            return False
        return site.is_linear and site.op == "aten.linear.default" and site.weight_name == "weight"

    def describe(self) -> str:
        return "every nn.Linear but the output head"


_BNB_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what bitsandbytes' 4-bit quantizer takes


def plan(spec: Quantize, model: nn.Module, sites: list[Site]) -> list[str]:
    """The module paths ``spec`` quantizes among ``sites`` (a trace's), checked before anything changes.

    Raises:
        QuantizationError: bitsandbytes is missing, the model is quantized already, or
            a selected weight isn't an ``nn.Linear``'s float matrix.
        RuleError: an explicit selector that selects nothing.
    """
    _bitsandbytes()
    if any(is_packed(p) for p in model.parameters()):
        raise QuantizationError(f"{type(model).__name__} is quantized already (bitsandbytes 4-bit or 8-bit weights); "
                                "compile it without quantize=")
    selector = spec.select if spec.select is not None else DefaultLinears()
    head = _output_head(model)
    chosen = [s for s in sites if selector(s) and not (isinstance(selector, DefaultLinears) and s.path in head)]
    if not chosen and spec.select is not None:
        raise RuleError(f"quantize select={selector.describe()} selects no linear weight")
    paths = []
    for site in chosen:
        module = model.get_submodule(site.path) if site.path else model
        if type(module) is not nn.Linear or site.weight_name != "weight" or site.op != "aten.linear.default":
            raise QuantizationError(
                f"quantize selects {site}, which is not an nn.Linear's weight; bitsandbytes' Linear4bit "
                "replaces nn.Linear modules only. Narrow the selector, e.g. select=peftc.linear(...)"
            )
        if site.path in head:
            raise QuantizationError(f"quantize selects {site.path}, whose weight is tied to the input embeddings; "
                                    "exclude it from the selector (& ~peftc.module(...))")
        if module.weight.dtype not in _BNB_FLOATS or module.weight.dim() != 2 or module.weight.numel() == 0:
            raise QuantizationError(f"{site.path}.weight is {module.weight.dtype} {tuple(module.weight.shape)}; "
                                    "bitsandbytes' 4-bit blocks hold a non-empty float32, float16 or bfloat16 "
                                    "matrix. Cast the model (model.float()) or narrow the selector")
        if site.path not in paths:
            paths.append(site.path)
    return paths


def _output_head(model: nn.Module) -> set[str]:
    """Paths of the output head and of every linear sharing the input embeddings' weight (kept in float)."""
    names = {id(m): p for p, m in model.named_modules()}
    out = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head) in names:
        out.add(names[id(head)])
    tied = getattr(input_embeddings_of(model), "weight", None)
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and tied is not None and m.weight is tied:
            out.add(path)
    return out


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizationError("quantize= needs bitsandbytes: pip install 'peftc[qlora]'") from e
    return bitsandbytes


def quantize_modules(model: nn.Module, spec: Quantize, paths: list[str], progress: bool | None = None) -> None:
    """Replace each ``nn.Linear`` at ``paths`` by a bitsandbytes ``Linear4bit`` holding its weight in 4 bits.

    One layer at a time: each float weight is released as soon as its packed form
    is in place, so memory never holds the float model and the quantized one
    together. The bias (if any) is the same ``Parameter`` object as before. The
    model is marked ``is_loaded_in_4bit``, as transformers marks the models it quantizes.

    :func:`plan` has checked every weight against what bitsandbytes takes, so this
    fails only on what no check can foresee (memory running out, an interrupt).

    Raises:
        QuantizationError: bitsandbytes failed on a weight. The layers before it are
            quantized by then (their float weights are gone, which is the point of
            going layer by layer); the message names them.
    """
    bnb = _bitsandbytes()
    done: list[str] = []
    with tqdm(paths, desc="quantizing", unit="linear", disable=hide_progress(progress, len(paths))) as bar:
        for path in bar:
            old = model.get_submodule(path)
            try:
                with torch.device("meta"):
                    new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                            compute_dtype=spec.compute_dtype, compress_statistics=spec.double_quant,
                                            quant_type=spec.quant_type)
                weight = old.weight.detach()
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=spec.blocksize,
                                               compress_statistics=spec.double_quant, quant_type=spec.quant_type,
                                               module=new).to(weight.device)  # quantizes
            except Exception as e:
                raise QuantizationError(f"bitsandbytes could not quantize {path}.weight: {first_line(e)}. "
                                        f"Quantized before it: {done or 'none'}") from e
            new.bias = old.bias
            new.train(old.training)
            model.set_submodule(path, new)
            done.append(path)
            del old, weight
    if done:
        model.is_loaded_in_4bit = True  # transformers' mark of a 4-bit model, which PEFT reads


def dequantize_modules(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes ``Linear4bit`` and ``Linear8bitLt`` in ``model`` by an ``nn.Linear``
    with its dequantized weight (a 4-bit one in the dtype it was quantized from, an 8-bit one in
    float32, as bitsandbytes dequantizes them); return their paths."""
    return list(_dequantize(model))


def _dequantize(model: nn.Module) -> dict[str, nn.Module]:
    """:func:`dequantize_modules`, returning the quantized modules it replaced, by path."""
    replaced = {p: m for p, m in model.named_modules() if is_packed(getattr(m, "weight", None))}
    for path, old in replaced.items():
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight = nn.Parameter(value(old.weight), requires_grad=False)
        new.bias = old.bias
        new.train(old.training)
        model.set_submodule(path, new)
    return replaced


@contextmanager
def dequantized(model: nn.Module) -> Iterator[list[str]]:
    """Inside, ``model``'s quantized linears are float ``nn.Linear`` (:func:`dequantize_modules`);
    on exit the quantized modules themselves are back, their storage untouched by what
    happened to the float weights. Yields the paths replaced."""
    replaced = _dequantize(model)
    try:
        yield list(replaced)
    finally:
        for path, old in replaced.items():
            model.set_submodule(path, old)


@contextmanager
def float_view(model: nn.Module) -> Iterator[Any]:
    """Inside, each quantized linear of ``model`` looks to ``torch.export`` like the float linear it stands for.

    Its weight reads as a zero-byte ``[out, in]`` tensor of the compute dtype (a 4-bit
    layer's; for an 8-bit layer, which computes in its input's dtype, the model's float
    dtype), and its forward as bitsandbytes' (the input cast to the compute dtype, the
    output cast back) with ``F.linear``. Yields ``own(ep)``: call it on the exported
    program to point its weights back at the quantized parameters (same object, never a
    copy); :mod:`peftc.passes.quantize` makes the graph read them. Everything is restored
    on exit, except that an 8-bit weight stays bound to its layer (:func:`peftc.storage.bind`).
    """
    swapped = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not is_packed(weight):
            continue
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            raise QuantizationError(
                f"{type(module).__name__} holds its weight in bitsandbytes' CPU inference layout (set by running "
                "it in eval mode under no_grad); reload the model, or compile it before running it"
            )
        bind(weight, module)
        shape, compute = read_as(weight)
        if bits(weight) == 8:
            compute = _float_dtype(model)
        stand_in = nn.Parameter(torch.zeros((), dtype=compute, device=weight.device).expand(shape), False)
        swapped.append((module, weight, stand_in))
    owners = {id(stand_in): weight for _, weight, stand_in in swapped}
    for module, _, stand_in in swapped:
        module._parameters["weight"] = stand_in
        module.forward = _float_forward.__get__(module)
    try:
        yield lambda ep: _own(ep, owners)
    finally:
        for module, weight, _ in swapped:
            module._parameters["weight"] = weight
            del module.forward


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first float parameter that isn't quantized (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not is_packed(p)), torch.float32)


def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A ``Linear4bit``'s forward with its weight in float (its stand-in, under :func:`float_view`)."""
    compute = self.weight.dtype
    bias = self.bias.to(compute) if self.bias is not None else None
    return torch.nn.functional.linear(x.to(compute), self.weight, bias).to(x.dtype)


def _own(ep, owners: dict[int, nn.Parameter]) -> None:
    for name, tensor in list(ep.state_dict.items()):
        if id(tensor) in owners:
            ep.state_dict[name] = owners[id(tensor)]


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """PEFT's ``prepare_model_for_kbit_training``, for a model about to be compiled.

    Freezes every parameter; casts every float16/bfloat16 parameter that isn't
    4-bit packed to float32 (layer norms, embeddings, the head, biases: PEFT's
    rule, so the numbers match its QLoRA); makes the input embeddings' output
    require grad (transformers' ``enable_input_require_grads``); and, with
    ``use_gradient_checkpointing``, asks the model for it through its own
    ``gradient_checkpointing_enable``.

    Returns:
        ``model``, changed in place.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and not is_packed(p):
            p.data = p.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise PeftcError(f"{type(model).__name__} has no gradient_checkpointing_enable; pass "
                             "use_gradient_checkpointing=False")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {})
    return model
