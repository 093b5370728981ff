"""Export a compiled model for deployment: ``"pt2"``, ``"onnx"`` or ``"hf"``.

Every format starts the same way: the model goes to eval mode, LoRA and BitFit
are merged into the weights (so the exported graph is the base model's graph
with merged weights, no adapter nodes), the artifact is written, and the model
is put back exactly in the merged or unmerged state and train/eval mode it was
in. The artifact is then loaded back from disk and its outputs compared with
the outputs the model gave *before* merging (unmerged, if it was), on the
example inputs and on a second batch with another batch size and length.

- ``"pt2"``: an ``ExportedProgram`` saved with :func:`torch.export.save`. It
  loads with :func:`torch.export.load` and runs with torch alone (neither peftc
  nor transformers is imported), with dynamic batch and sequence length.
- ``"onnx"``: the same program through ``torch.onnx.export(..., dynamo=True)``,
  batch and sequence axes dynamic, checked with onnxruntime.
- ``"hf"``: the user's own model class with merged weights, written by its
  ``save_pretrained``; loads with plain transformers (``from_pretrained``).

Prompt and prefix adapters can't be folded into weights. ``"pt2"`` and
``"onnx"`` export the adapted graph itself, the prompt or prefix table baked
into the artifact; ``"hf"`` raises :class:`~peftc.PeftcError`.

The pt2 and ONNX programs take the model's tensor inputs as keyword arguments
(``input_ids=..., attention_mask=...``; constant inputs such as
``use_cache=False`` are baked in) and return a flat tuple of tensors: the
model's outputs in order, ``None`` entries dropped. For a transformers model
that is ``ModelOutput.to_tuple()``: ``(logits,)`` for a causal LM called
without labels. ``torch.export.load(path, extra_files={"peftc.json": ""})``
reads back the input and output names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils import _pytree as pytree

from ..boundary import as_keywords
from ..errors import MergeError, PeftcError
from ..passes.merge import missing_biases
from ..trace import call_inputs, default_inputs, with_defaults

FORMATS = ("pt2", "onnx", "hf")
SUFFIX = {"pt2": ".pt2", "onnx": ".onnx"}
METADATA = "peftc.json"  # extra file in a .pt2 archive: input and output names


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how it checked it.

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


def export(cm, path, format: str = "pt2", example_inputs=None, *, verify: bool = True,
           atol: float | None = None, rtol: float | None = None) -> Path:
    """Export ``cm`` with its adapters merged (or baked in) to ``path``; return what was written.

    Arguments:
        cm: a :class:`~peftc.CompiledModel`.
        path: for ``"pt2"``/``"onnx"`` a file (``model.pt2``); a folder, or a
            path without a suffix, gets ``model.pt2`` / ``model.onnx`` inside.
            For ``"hf"`` a folder.
        format: ``"pt2"``, ``"onnx"`` or ``"hf"``.
        example_inputs: as for :func:`peftc.compile`. Default: the inputs of a
            trace ``cm`` already has (without ``labels``), else a 2x8 batch of
            token ids for a transformers text model.
        verify: load the artifact back and compare it with the model's outputs
            (before merging) on the example and on a batch of another size and length.
        atol, rtol: the comparison's tolerances (default 1e-4 for float32 and
            float64 outputs, 2e-2 for float16 / bfloat16).

    Returns:
        The path of the file or folder written.

    Raises:
        PeftcError: an unknown format; ``"hf"`` with prompt or prefix adapters,
            or for a model that isn't a transformers model; an export that fails;
            an artifact whose outputs differ from the model's.
    """
    return export_model(cm, path, format, example_inputs, verify=verify, atol=atol, rtol=rtol).path


def export_model(cm, path, format: str = "pt2", example_inputs=None, *, verify: bool = True,
                 atol: float | None = None, rtol: float | None = None,
                 on_stage: Callable[[str], None] | None = None) -> ExportResult:
    """:func:`export`, returning an :class:`ExportResult`.

    ``on_stage`` is called with ``"merge"``, ``"export"`` and ``"verify"`` as each stage starts.
    """
    fmt = _check_format(format)
    target = _target(path, fmt)
    model = cm.base_model
    if fmt == "hf":
        _check_hf_model(model)
        _check_mergeable(cm)
    stage = on_stage or (lambda name: None)
    modes = [(m, m.training) for m in cm.modules()]
    was_merged = cm.merged
    try:
        stage("merge")
        cm.eval()
        inputs = _example_kwargs(cm, example_inputs)
        with torch.no_grad():  # the reference: the model before merging
            batches = [inputs, _other_batch(cm, inputs)] if verify else [inputs]
            refs = [_flatten(cm(**b)) for b in batches]
        if not refs[0]:
            raise PeftcError(f"{type(model).__name__} returns no tensors for these inputs; nothing to export")
        reason = _merge(cm, fmt)
        stage("export")
        tensors = [name for name, v in inputs.items() if isinstance(v, torch.Tensor)]
        outputs = [name for name, _ in refs[0]]
        (target if fmt == "hf" else target.parent).mkdir(parents=True, exist_ok=True)
        if fmt == "hf":
            _save_hf(cm, target)
        else:
            module = _Program.build(cm, inputs, tensors, reason)
            with _quiet(), torch.no_grad():
                ep = _export_program(module, cm, inputs, tensors)
                if fmt == "pt2":
                    meta = {"inputs": tensors, "outputs": outputs, "model": type(model).__name__,
                            "merged": reason is None}
                    torch.export.save(ep, target, extra_files={METADATA: json.dumps(meta)})
                else:
                    _save_onnx(ep, target, {k: inputs[k] for k in tensors}, outputs)
        merged = reason is None
    finally:
        try:
            if cm.merged and not was_merged:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cm.unmerge(progress=False)
        finally:
            for m, training in modes:
                m.training = training
    result = ExportResult(target, fmt, tensors, outputs, merged)
    if verify:
        stage("verify")
        _verify(result, model, batches, refs, atol, rtol)
    return result


# -- preparing --------------------------------------------------------------------


def _check_format(format) -> str:
    fmt = str(format).lower().lstrip(".")
    if fmt not in FORMATS:
        raise PeftcError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _check_hf_model(model: nn.Module) -> None:
    if not (hasattr(model, "save_pretrained") and hasattr(type(model), "from_pretrained")
            and hasattr(model, "config")):
        raise PeftcError(
            f"format 'hf' needs a transformers model (save_pretrained / from_pretrained); "
            f"{type(model).__name__} is not one. Export as 'pt2' or 'onnx' instead"
        )


def _check_mergeable(cm) -> None:
    """Format 'hf' holds weights only: fail early on active adapters that can't merge."""
    if cm.merged:
        return
    active = getattr(cm, "active_adapters", None)
    names = set(active) if isinstance(active, (list, tuple)) else None
    bad = sorted({f"{p.adapter_name}: {p.adapter!r}" for p in cm.sites
                  if not p.adapter.mergeable and (names is None or p.adapter_name in names)})
    if bad:
        raise _not_hf(f"adapters {', '.join(bad)} add tokens or keys, not weight deltas")
    placements = [p for p in cm.sites if names is None or p.adapter_name in names]
    try:
        missing = [path for _, path in missing_biases(cm.base_model, placements)]
    except MergeError:
        return  # merge() reports it
    if missing:
        raise _no_bias(cm, missing)


def _no_bias(cm, paths: list[str]) -> PeftcError:
    return PeftcError(
        f"merging adds biases that {type(cm.base_model).__name__} has no place for "
        f"({', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}); transformers would drop them "
        "on loading. Export as 'pt2' or 'onnx' instead"
    )


def _not_hf(why: str) -> PeftcError:
    return PeftcError(
        f"format 'hf' holds merged weights only and can't hold these adapters ({why}). Export as "
        "'pt2' or 'onnx' instead: they bake prompt and prefix adapters into the exported graph"
    )


def _target(path, fmt: str) -> Path:
    """Where to write (created only when writing): a folder for hf, else a file."""
    p = Path(path)
    if fmt == "hf":
        if p.exists() and not p.is_dir():
            raise PeftcError(f"format 'hf' writes a folder, and {p} is a file")
        return p
    if p.is_dir() or not p.suffix:
        return p / f"model{SUFFIX[fmt]}"
    if p.parent.exists() and not p.parent.is_dir():
        raise PeftcError(f"can't write {p}: {p.parent} is a file")
    return p


def _example_kwargs(cm, example_inputs) -> dict:
    """The export's inputs, all by keyword, in the forward's order; None values dropped."""
    model = cm.base_model
    if example_inputs is not None:
        args, kwargs = call_inputs(model, example_inputs)
    else:
        args, kwargs = _trace_inputs(cm)
    kwargs = as_keywords(model, args, with_defaults(model, kwargs))
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor) and any(
                isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)):
            raise PeftcError(f"export takes tensors and constants as inputs; {name} is a "
                             f"{type(value).__name__} of tensors. Pass example_inputs without it")
    return kwargs


def _trace_inputs(cm) -> tuple[tuple, dict]:
    """The inputs of a trace cm already has (eval traces first), or the default batch."""
    traces = [v.trace for vs in getattr(cm, "_variants", {}).values() for v in vs]
    traces += [t for t in (getattr(cm, "_first", None), getattr(cm, "_catalog", None)) if t is not None]
    traces.sort(key=lambda t: bool(t.key[0]))  # eval traces first
    for t in traces:
        example = getattr(t.ep, "example_inputs", None)
        if not example:
            continue
        args, kwargs = example
        if t.boundary:
            args, kwargs = (), dict(args[0])
        leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in leaves):
            continue
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        return tuple(args), kwargs
    return (), default_inputs(cm.base_model)


def _other_batch(cm, inputs: dict) -> dict:
    """The example resized along each dim the trace keeps dynamic: batch + 1, length - 3
    (+ 1 when short); inputs are tiled and cropped, so token ids stay valid."""
    model_inputs = cm._inputs((), dict(inputs))[1]
    trace = cm._variant((), model_inputs).trace
    vals = {n.name: n.meta.get("val") for n in trace.ep.graph.nodes if n.op == "placeholder"}
    specs = iter(s for s in trace.ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
    traced: dict[str, torch.Tensor] = {}  # input name -> the trace's (symbolic) value
    for name in trace.kwarg_order:
        mine = [next(specs, None) for _ in pytree.tree_leaves(model_inputs[name])]
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
    low, high = (_int(bounds.lower, 0), _int(bounds.upper, new)) if bounds is not None else (0, new)
    if not low <= new <= high:
        new = size - 1 if low <= size - 1 else size
    return max(new, 1)


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):  # sympy's infinities
        return default


def _tile(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(t.shape) == shape:
        return t
    reps = [max(1, math.ceil(n / max(s, 1))) for n, s in zip(shape, t.shape, strict=True)]
    out = t.repeat(*reps)
    return out[tuple(slice(0, n) for n in shape)].clone()


def _flatten(out, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
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
        pairs += _flatten(value, name)
    return pairs


def _merge(cm, fmt: str) -> str | None:
    """Merge unless merged already; None when the graph to export is the merged base graph,
    else why not (prompt or prefix adapters: the adapted graph is exported then)."""
    if not cm.merged:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cm.merge(progress=False)
        except MergeError as e:
            if fmt == "hf":
                raise _not_hf(_first_line(e)) from e
            return _first_line(e)
    if fmt == "hf" and getattr(cm, "_created_biases", None):
        raise _no_bias(cm, list(cm._created_biases))
    return None


# -- exporting --------------------------------------------------------------------


class _Program(nn.Module):
    """What is exported: the merged base model, or the adapted graph module, called with
    the tensor inputs by keyword (constants baked in), returning a flat tuple of tensors."""

    def __init__(self, model: nn.Module, constants: dict, trace=None):
        super().__init__()
        self.model = model
        self._constants = constants
        self._trace = trace  # set: ``model`` is the adapted graph module, called as the trace says

    @staticmethod
    def build(cm, inputs: dict, tensors: list[str], reason: str | None) -> _Program:
        """A program whose ``forward`` takes exactly the tensor inputs, by name."""
        constants = {k: v for k, v in inputs.items() if k not in tensors}
        module, trace = cm.base_model, None
        if reason is not None:  # the graph cm runs, adapter nodes and all
            variant = cm._variant((), cm._inputs((), dict(inputs))[1])
            module, trace = variant.gm, variant.trace
        namespace: dict = {}
        exec(f"def forward(self, {', '.join(tensors)}):\n"  # names are the forward's own parameters
             f"    return self._run(dict({', '.join(f'{n}={n}' for n in tensors)}))\n", namespace)
        cls = type("ExportedModel", (_Program,), {"forward": namespace["forward"]})
        return cls(module, constants, trace)

    def _run(self, tensors: dict):
        kwargs = {**tensors, **self._constants}
        if self._trace is None:
            out = self.model(**kwargs)
        else:
            args, kwargs = self._trace.call_args((), {k: kwargs[k] for k in self._trace.kwarg_order})
            out = self.model(*args, **kwargs)
        return tuple(t for _, t in _flatten(out))


def _dynamic(value):
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return {d: Dim.AUTO for d in range(min(value.dim(), 2))}
    return None


def _export_program(module: nn.Module, cm, inputs: dict, tensors: list[str]):
    kwargs = {k: inputs[k] for k in tensors}
    try:
        return torch.export.export(module, (), kwargs, dynamic_shapes={k: _dynamic(v) for k, v in kwargs.items()},
                                   strict=False)
    except Exception as e:
        raise PeftcError(
            f"torch.export could not export {type(cm.base_model).__name__} with dynamic batch and "
            f"sequence length: {type(e).__name__}: {_first_line(e)}"
        ) from e


def _save_onnx(ep, target: Path, kwargs: dict, outputs: list[str]) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise PeftcError("format 'onnx' needs onnx and onnxscript: pip install 'peftc[onnx]'") from e
    try:
        program = torch.onnx.export(ep, (), None, kwargs=kwargs, dynamo=True, output_names=outputs,
                                    verbose=False)
    except Exception as e:
        raise PeftcError(f"torch.onnx.export (dynamo=True) failed: {type(e).__name__}: {_first_line(e)}") from e
    _name_axes(program, ep, kwargs)
    program.save(str(target))


def _name_axes(program, ep, kwargs: dict) -> None:
    """Name the dynamic axes ``batch`` and ``sequence`` where the program's inputs share them."""
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    user = [s.arg.name for s in ep.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT and isinstance(s.arg, TensorArgument)]
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    for name in user:
        val = vals.get(name)
        for d, dim in enumerate(getattr(val, "shape", ())):
            if not isinstance(dim, torch.SymInt) or not dim.node.expr.is_Symbol:
                continue
            sym = str(dim.node.expr)
            if sym in mapping:
                continue
            label = "batch" if d == 0 else "sequence" if d == 1 else f"{name}_dim{d}"
            if label in taken:
                label = f"{name}_dim{d}"
            mapping[sym] = label
            taken.add(label)
    with contextlib.suppress(Exception):  # names are cosmetic
        program.rename_axes(mapping)


def _save_hf(cm, target: Path) -> None:
    model = cm.base_model
    try:
        with _quiet():
            model.save_pretrained(target)
    except Exception as e:
        raise PeftcError(f"{type(model).__name__}.save_pretrained({target}) failed: {_first_line(e)}") from e


@contextlib.contextmanager
def _quiet():
    """Silence export's warnings, logging (0/1 specialisation notes) and transformers' progress bars."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_logs())
        hf_logging = sys.modules.get("transformers.utils.logging")  # only if transformers is in use
        if hf_logging is not None and hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
        yield


@contextlib.contextmanager
def _quiet_logs():
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._export", "torch.onnx",
                                               "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# -- verifying ----------------------------------------------------------------------


def _verify(result: ExportResult, model: nn.Module, batches: list[dict], refs: list, atol, rtol) -> None:
    run = {"pt2": _run_pt2, "onnx": _run_onnx, "hf": _run_hf}[result.format](result, model)
    worst = 0.0
    where = f"the exported {result.format} at {result.path}"
    for batch, ref in zip(batches, refs, strict=True):
        shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        result.checked_shapes.append(shapes)
        try:
            got = dict(run(batch))
        except Exception as e:
            raise PeftcError(f"{where} fails on inputs {_shapes(shapes)}: {type(e).__name__}: {_first_line(e)}") from e
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
    with _quiet():
        loaded = type(model).from_pretrained(result.path, local_files_only=True, **kwargs)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loaded = loaded.to(device).eval()

    def run(batch):
        with torch.no_grad():
            return _flatten(loaded(**batch))

    return run


def _named(result: ExportResult, values) -> list[tuple[str, torch.Tensor]]:
    values = list(values)
    if len(values) != len(result.outputs):
        raise PeftcError(f"it returns {len(values)} outputs where the model returns {len(result.outputs)}")
    return list(zip(result.outputs, values, strict=True))


def _shapes(shapes: dict) -> str:
    return ", ".join(f"{k}{list(v)}" for k, v in shapes.items())


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:400] if lines else type(e).__name__
