"""Export a compiled model for deployment: ``"pt2"``, ``"onnx"`` or ``"hf"``.

This module merges, builds the program to export and writes the artifact;
:mod:`peftc.formats.verify` loads it back and compares (and holds
:class:`~peftc.formats.verify.ExportResult`).

Every format starts the same way: the model goes to eval mode, LoRA and BitFit
are merged into the weights (so the exported graph is the base model's graph
with merged weights, no adapter nodes), the artifact is written, and the model
is put back exactly in the merged or unmerged state and train/eval mode it was
in. The artifact is then loaded back from disk and its outputs compared with
the outputs the model gave *before* merging (unmerged, if it was), on the
example inputs and on a second batch with another batch size and length.

Writing is atomic (:mod:`peftc.formats.atomic`): the artifact is written and
verified in a hidden sibling of the target, and moved into place only then. A
failure at any point (a full disk, a failed check, an interrupt) leaves what
was at the target before untouched and no partial files. Before writing a
``.pt2`` the free space is checked against its size, since torch's archive
writer aborts the whole process when the disk fills.

- ``"pt2"``: an ``ExportedProgram`` saved with :func:`torch.export.save`. It
  loads with :func:`torch.export.load` and runs with torch alone (neither peftc
  nor transformers is imported), with dynamic batch and sequence length.
- ``"onnx"``: the same program through ``torch.onnx.export(..., dynamo=True)``,
  batch and sequence axes dynamic, checked with onnxruntime.
- ``"hf"``: the user's own model class with merged weights, written by its
  ``save_pretrained``; loads with plain transformers (``from_pretrained``).

A bitsandbytes-quantized base (4-bit or 8-bit) exports to ``"hf"`` only: the
adapters merged into its *dequantized* weights, a float model that plain
transformers loads (the quantized layers themselves are untouched and back in
place afterwards). ``"pt2"`` and ``"onnx"`` raise: a program holding
bitsandbytes' storage needs bitsandbytes' ops to load, not torch alone. An
8-bit base computes with int8 activations (LLM.int8()), so its float export is
compared with the quantized model at 2e-2 by default.

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
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils import _pytree as pytree

from ..errors import MergeError, PeftcError, first_line
from ..passes.merge import mergeable_or_raise, missing_biases
from ..quantization import dequantized
from ..quiet import quiet
from ..signature import as_keywords
from ..storage import bits
from ..trace import call_inputs, default_inputs, with_defaults
from .atomic import check_space, staged
from .verify import ExportResult, flatten_outputs, other_batch, verify_artifact

__all__ = ["FORMATS", "ExportResult", "export", "export_model", "target_path"]

FORMATS = ("pt2", "onnx", "hf")
SUFFIX = {"pt2": ".pt2", "onnx": ".onnx"}
METADATA = "peftc.json"  # extra file in a .pt2 archive: input and output names
# Silenced while exporting (0/1 specialisation notes and the like) and saving.
LOGGERS = ("torch", "torch.export", "torch._export", "torch.onnx", "onnxscript")


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
    target = target_path(path, fmt)
    model = cm.base_model
    quantized = {bits(p) for p in model.parameters()} - {None}
    if quantized and fmt != "hf":
        raise PeftcError(f"{type(model).__name__} holds bitsandbytes {'/'.join(f'{b}-bit' for b in sorted(quantized))} "
                         f"weights, which a {fmt} program torch loads alone can't hold. Export format='hf' "
                         "(the adapters merged into the dequantized weights: a float model)")
    if fmt == "hf":
        _check_hf_model(model)
        _check_mergeable(cm)
    if 8 in quantized and atol is None:  # LLM.int8() rounds activations to int8; the float export doesn't
        atol = rtol = 2e-2
    stage = on_stage or (lambda name: None)
    with staged(target, stale=_old_weights if fmt == "hf" else None) as written:
        result = _write_and_verify(cm, target, written, fmt, example_inputs, verify, atol, rtol, quantized,
                                   stage)
    result.path = target
    return result


def _write_and_verify(cm, target: Path, written: Path, fmt: str, example_inputs, verify: bool, atol, rtol,
                      quantized: set, stage: Callable[[str], None]) -> ExportResult:
    """Merge, write the artifact at ``written`` (the staging path of ``target``), put the model
    back as it was, then load the artifact back and compare."""
    model = cm.base_model
    modes = [(m, m.training) for m in cm.modules()]
    was_merged = cm.merged
    try:
        stage("merge")
        cm.eval()
        inputs = _example_kwargs(cm, example_inputs)
        with torch.no_grad():  # the reference: the model before merging
            batches = [inputs, other_batch(cm, inputs)] if verify else [inputs]
            refs = [flatten_outputs(cm(**b)) for b in batches]
        if not refs[0]:
            raise PeftcError(f"{type(model).__name__} returns no tensors for these inputs; nothing to export")
        tensors = [name for name, v in inputs.items() if isinstance(v, torch.Tensor)]
        outputs = [name for name, _ in refs[0]]
        with _float_base(cm) if quantized else contextlib.nullcontext():
            try:
                reason = _merge(cm, fmt)
                stage("export")
                _write(cm, written, fmt, inputs, tensors, outputs, reason)
            finally:
                if cm.merged and not was_merged:
                    with quiet():
                        cm.unmerge(progress=False)
        merged = reason is None
    finally:
        for m, training in modes:
            m.training = training
    result = ExportResult(written, fmt, tensors, outputs, merged)
    if verify:
        stage("verify")
        verify_artifact(result, model, batches, refs, atol, rtol, shown=target)
    return result


def _write(cm, target: Path, fmt: str, inputs: dict, tensors: list[str], outputs: list[str],
           reason: str | None) -> None:
    if fmt == "hf":
        _save_hf(cm, target)
        return
    module = _Program.build(cm, inputs, tensors, reason)
    with quiet(LOGGERS, hf_progress=True), torch.no_grad():
        ep = _export_program(module, cm, inputs, tensors)
        if fmt == "pt2":
            meta = {"inputs": tensors, "outputs": outputs, "model": type(cm.base_model).__name__,
                    "merged": reason is None}
            # torch's archive writer aborts the process when the disk fills: check first
            check_space(target.parent, _pt2_size(ep), f"the pt2 export {target.name}")
            torch.export.save(ep, target, extra_files={METADATA: json.dumps(meta)})
        else:
            _save_onnx(ep, target, {k: inputs[k] for k in tensors}, outputs)


def _pt2_size(ep) -> int:
    """An upper estimate of a .pt2 archive's size: its tensors' storage bytes, each storage
    once, plus 10% and 16 MiB for the serialized graph, alignment and the zip's records."""
    storages = {}
    for t in [*ep.state_dict.values(), *ep.constants.values()]:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            storages[(storage.data_ptr(), t.device)] = storage.nbytes()
    total = sum(storages.values())
    return int(total * 1.1) + (16 << 20)


def _old_weights(path: Path) -> bool:
    """Whether ``path``, in a folder an ``"hf"`` export replaces, holds the old model's weights
    (removed with the swap unless the new export writes the same name)."""
    name = path.name
    return name.startswith(("model", "pytorch_model")) and name.endswith(
        (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))


@contextlib.contextmanager
def _float_base(cm):
    """Inside, the quantized base's linears are float ones holding the dequantized weights, so a
    merge adds the deltas exactly (no requantizing) and ``save_pretrained`` writes a float model;
    the quantized modules come back untouched on exit. The built graphs read the quantized
    storage, so they are dropped first (the next call traces again) rather than rebuilt around
    weights they don't read."""
    cm.programs.clear()
    with dequantized(cm.base_model), quiet(LOGGERS):
        config = getattr(cm.base_model, "config", None)
        quantization = getattr(config, "quantization_config", None)
        if quantization is not None:  # what transformers' from_pretrained read: the export has none
            del config.quantization_config
        try:
            yield
        finally:
            if quantization is not None:
                config.quantization_config = quantization


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
    """Format 'hf' holds weights only: fail before merging on active adapters that can't
    merge, or that would add biases the model class has no place for (the checks merge runs)."""
    if cm.merged:
        return
    names = set(cm.active_adapters)
    placements = [p for p in cm.sites if p.adapter_name in names]
    try:
        mergeable_or_raise(placements)
    except MergeError as e:
        raise _not_hf(first_line(e)) from e
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


def target_path(path, fmt: str) -> Path:
    """Where an export of format ``fmt`` to ``path`` is written: a folder for hf, else a file
    (``path/model.pt2`` for a folder or a path without a suffix).

    Raises:
        PeftcError: a path that can't take the artifact (a file where a folder goes).
    """
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
    for t in sorted(cm.programs.traces(), key=lambda t: t.training):  # eval traces first
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


def _merge(cm, fmt: str) -> str | None:
    """Merge unless merged already; None when the graph to export is the merged base graph,
    else why not (prompt or prefix adapters: the adapted graph is exported then)."""
    if not cm.merged:
        try:
            with quiet():
                cm.merge(progress=False)
        except MergeError as e:
            if fmt == "hf":
                raise _not_hf(first_line(e)) from e
            return first_line(e)
    if fmt == "hf" and cm.created_biases:
        raise _no_bias(cm, cm.created_biases)
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
            program = cm.program_for(**inputs)
            module, trace = program.gm, program.trace

        # No generated code: ``forward`` takes ``**tensors`` and declares the tensor inputs
        # as keyword-only parameters in ``__signature__``. torch.export binds the inputs and
        # keys ``dynamic_shapes`` through ``inspect.signature(module.forward)``, which reads
        # it (a bare ``**tensors`` makes export expect ``dynamic_shapes={"tensors": ...}``).
        # A fresh function per program, so each class has its own signature.
        def forward(self, **tensors):
            return self._run(tensors)

        keyword = inspect.Parameter.KEYWORD_ONLY
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
             *(inspect.Parameter(name, keyword) for name in tensors)])
        cls = type("ExportedModel", (_Program,), {"forward": forward})
        return cls(module, constants, trace)

    def _run(self, tensors: dict):
        kwargs = {**tensors, **self._constants}
        if self._trace is None:
            out = self.model(**kwargs)
        else:
            args, kwargs = self._trace.call_args((), {k: kwargs[k] for k in self._trace.kwarg_order})
            out = self.model(*args, **kwargs)
        return tuple(t for _, t in flatten_outputs(out))


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
            f"sequence length: {type(e).__name__}: {first_line(e)}"
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
        raise PeftcError(f"torch.onnx.export (dynamo=True) failed: {type(e).__name__}: {first_line(e)}") from e
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
        with quiet(LOGGERS, hf_progress=True):
            model.save_pretrained(target)
    except Exception as e:
        raise PeftcError(f"{type(model).__name__}.save_pretrained({target}) failed: {first_line(e)}") from e
