"""Check an export: load the artifact back the way a deployment would and compare outputs.

Holds :class:`ExportResult` (what :func:`~peftc.formats.export.export_model`
wrote and how it checked it), :func:`flatten_outputs` (a model's outputs as
named tensors, the reference), :func:`other_batch` (the second check batch: the
example resized along the dims the trace keeps dynamic) and
:func:`verify_artifact` with its three loaders: ``torch.export.load`` for pt2,
onnxruntime for ONNX, the model class's ``from_pretrained`` for hf.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils import _pytree as pytree

from ..errors import PeftcError, first_line
from ..quiet import quiet
from ..trace import range_bound

# Silenced while transformers loads an hf export back.
LOAD_LOGGERS = ("torch", "transformers")


@dataclass
class ExportResult:
    """What :func:`~peftc.formats.export.export_model` wrote and how it checked it.

    Attributes:
        path: the file (pt2, onnx) or folder (hf) written.
        format: ``"pt2"``, ``"onnx"`` or ``"hf"``.
        inputs: the artifact's input names, in order.
        outputs: the artifact's output names, in order (``logits`` first for a causal LM).
        merged: whether the exported graph is the base graph with merged weights
            (False: prompt or prefix adapters exported in the graph).
        max_diff: the largest absolute difference from the unmerged model's
            outputs over both checked batches (None when not verified).
        checked_shapes: the input shapes each check ran on.
    """

    path: Path
    format: str
    inputs: list[str]
    outputs: list[str]
    merged: bool
    max_diff: float | None = None
    checked_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)


def flatten_outputs(out, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """A model's outputs as ``(name, tensor)`` pairs, in order; None and non-tensors dropped."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    items = None
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):  # dict, ModelOutput
        items = [(str(k), out[k]) for k in out.keys()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    if items is None:
        return []
    pairs = []
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else (key if not key.isdigit() else f"output_{key}")
        pairs += flatten_outputs(value, name)
    return pairs


# -- the second batch ------------------------------------------------------------------


def other_batch(cm, inputs: dict) -> dict:
    """The example resized along each dim the trace keeps dynamic: batch + 1, length - 3
    (+ 1 when short); inputs are tiled and cropped, so token ids stay valid.

    ``inputs`` are keyword inputs as the forward normalises them (None values dropped).
    """
    trace = cm.program_for(**inputs).trace
    vals = {n.name: n.meta.get("val") for n in trace.ep.graph.nodes if n.op == "placeholder"}
    specs = iter(s for s in trace.ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
    traced: dict[str, torch.Tensor] = {}  # input name -> the trace's (symbolic) value
    for name in trace.kwarg_order:
        mine = [next(specs, None) for _ in pytree.tree_leaves(inputs[name])]
        if len(mine) == 1 and mine[0] is not None and isinstance(mine[0].arg, TensorArgument):
            val = vals.get(mine[0].arg.name)
            if isinstance(val, torch.Tensor) and isinstance(inputs.get(name), torch.Tensor):
                traced[name] = val
    sizes: dict = {}  # symbol -> new size
    for name, val in traced.items():
        for d, (dim, size) in enumerate(zip(val.shape, inputs[name].shape, strict=False)):
            if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol and dim.node.expr not in sizes:
                sizes[dim.node.expr] = _resize(size, d, trace.ep.range_constraints.get(dim.node.expr))
    out = dict(inputs)
    for name, val in traced.items():
        shape = []
        for dim, size in zip(val.shape, inputs[name].shape, strict=False):
            if isinstance(dim, torch.SymInt) and dim.node.expr.free_symbols <= set(sizes):
                with contextlib.suppress(TypeError, ValueError):
                    size = int(dim.node.expr.subs(sizes))
            shape.append(size)
        out[name] = _tile(inputs[name], shape)
    return out


def _resize(size: int, dim: int, bounds) -> int:
    new = size + 1 if dim == 0 or size <= 4 else size - 3
    low, high = (range_bound(bounds.lower, 0), range_bound(bounds.upper, new)) if bounds is not None else (0, new)
    if not low <= new <= high:
        new = size - 1 if low <= size - 1 else size
    return max(new, 1)


def _tile(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(t.shape) == shape:
        return t
    reps = [max(1, math.ceil(n / max(s, 1))) for n, s in zip(shape, t.shape, strict=True)]
    out = t.repeat(*reps)
    return out[tuple(slice(0, n) for n in shape)].clone()


# -- comparing -----------------------------------------------------------------------


def verify_artifact(result: ExportResult, model: nn.Module, batches: list[dict], refs: list,
                    atol: float | None, rtol: float | None, shown: Path | None = None) -> None:
    """Load ``result.path`` back, run it on each batch and compare with ``refs`` (the model's
    outputs before merging); set ``result.max_diff`` and ``result.checked_shapes``.

    ``shown``: the path errors name (the artifact's destination while it is checked in a
    staging folder); default ``result.path``.

    Raises:
        PeftcError: the artifact fails to run, misses an output, or differs beyond the tolerances.
    """
    run = {"pt2": _run_pt2, "onnx": _run_onnx, "hf": _run_hf}[result.format](result, model)
    worst = 0.0
    where = f"the exported {result.format} at {shown or result.path}"
    for batch, ref in zip(batches, refs, strict=True):
        shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        result.checked_shapes.append(shapes)
        try:
            got = dict(run(batch))
        except Exception as e:
            raise PeftcError(f"{where} fails on inputs {_shapes(shapes)}: {type(e).__name__}: {first_line(e)}") from e
        missing = [n for n, _ in ref if n not in got]
        if missing:
            raise PeftcError(f"{where} does not return {missing}; it returns {list(got)}")
        for name, expected in ref:
            actual = torch.as_tensor(got[name]).to(expected.device)
            if tuple(actual.shape) != tuple(expected.shape):
                raise PeftcError(f"{where}: {name} has shape {tuple(actual.shape)}, the model's "
                                 f"{tuple(expected.shape)} (inputs {_shapes(shapes)})")
            if not expected.is_floating_point():
                if not torch.equal(actual, expected):
                    raise PeftcError(f"{where}: {name} differs from the model's (inputs {_shapes(shapes)})")
                continue
            a, r = _tolerances(expected.dtype, atol, rtol)
            diff = (actual.double() - expected.double()).abs()
            top = float(diff.max()) if diff.numel() else 0.0
            worst = max(worst, top)
            if bool((diff > a + r * expected.double().abs()).any()) or math.isnan(top):
                raise PeftcError(f"{where} differs from the unmerged model: {name} max |diff| {top:.3g} > "
                                 f"atol {a:g} + rtol {r:g} * |value| on inputs {_shapes(shapes)}")
    result.max_diff = worst


def _tolerances(dtype: torch.dtype, atol, rtol) -> tuple[float, float]:
    loose = dtype in (torch.float16, torch.bfloat16)
    default = 2e-2 if loose else 1e-4
    return (default if atol is None else atol), (default if rtol is None else rtol)


def _run_pt2(result: ExportResult, model):
    ep = torch.export.load(result.path)
    module = ep.module()

    def run(batch):
        with torch.no_grad():
            return _named(result, module(**{k: batch[k] for k in result.inputs}))

    return run


def _run_onnx(result: ExportResult, model):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise PeftcError("verifying an ONNX export needs onnxruntime: pip install 'peftc[onnx]'") from e
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(batch):
        feed = {n: batch[n].detach().cpu().numpy() for n in names}
        return _named(result, [torch.from_numpy(x) for x in session.run(None, feed)])

    return run


def _run_hf(result: ExportResult, model):
    dtype = next((p.dtype for p in model.parameters()), None)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with quiet(LOAD_LOGGERS, hf_progress=True):
        loaded = type(model).from_pretrained(result.path, local_files_only=True, **kwargs)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loaded = loaded.to(device).eval()

    def run(batch):
        with torch.no_grad():
            return flatten_outputs(loaded(**batch))

    return run


def _named(result: ExportResult, values) -> list[tuple[str, torch.Tensor]]:
    values = list(values)
    if len(values) != len(result.outputs):
        raise PeftcError(f"it returns {len(values)} outputs where the model returns {len(result.outputs)}")
    return list(zip(result.outputs, values, strict=True))


def _shapes(shapes: dict) -> str:
    return ", ".join(f"{k}{list(v)}" for k, v in shapes.items())
