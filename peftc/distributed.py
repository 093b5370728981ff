"""FSDP2 for a compiled model: torch's ``fully_shard`` per layer, the graph reading the shards.

Under ``torchrun``, after :func:`peftc.compile`::

    dist.init_process_group("gloo")            # "nccl" on GPUs
    cm = peftc.compile(model, rules, backend="eager")
    peftc.distributed.fully_shard(cm)           # every decoder layer, then the root
    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad])

:func:`fully_shard` applies ``torch.distributed.fsdp.fully_shard`` to each
layer of the user's model (the modules transformers lists in
``_no_split_modules``: the decoder layers) and then to the compiled model
itself, whose unit holds the rest of the base (embeddings, norm, head) and
every adapter. Each rank keeps a 1/world shard of every weight. The graphs are
rebuilt by :mod:`peftc.passes.shard` to read each layer's weights inside a
call of that layer, so FSDP2's own hooks gather them just before the layer
runs and free them just after, in forward and again in backward; adapter
gradients are averaged over the ranks as under DDP.

``cm.save_pretrained`` then gathers the adapters on every rank (call it on all
of them) and writes on rank 0 only.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch import nn

from .errors import MergeError, PeftcError, QuantizationError
from .passes.shard import Sharding


def fully_shard(cm, mesh=None, *, layers: str | None = None, reshard_after_forward: bool = True,
                **fsdp_options):
    """Shard ``cm``'s base model and adapters over ``mesh`` with FSDP2, layer by layer.

    Layers (and ``cm``) that torch's ``fully_shard`` was already applied to (by your
    own per-layer calls, or Accelerate's FSDP2 plugin) are kept as they are: this
    call then only makes the graphs read their shards.

    Arguments:
        cm: a :class:`~peftc.CompiledModel` compiled with ``backend="eager"``, not merged.
        mesh: a 1-D ``DeviceMesh`` over every rank (default: one over the whole
            process group, on the parameters' device type).
        layers: a regular expression over module paths of the user's model choosing
            the layers to shard one by one (default: its ``_no_split_modules`` classes).
        reshard_after_forward: free each layer's gathered weights after its forward
            (FSDP2's option; the root keeps its own until backward either way).
        fsdp_options: more of ``torch.distributed.fsdp.fully_shard``'s options
            (``mp_policy``, ``offload_policy``), for every unit.

    Returns:
        ``cm``, now also an ``FSDPModule`` (``cm.unshard()``, ``cm.reshard()``...).

    Raises:
        PeftcError: no process group, a mesh that doesn't fit it, no layer found,
            already sharded, ``cm`` sharded (by torch's ``fully_shard``) before its layers, a
            module other than the layers and ``cm`` sharded as a unit of its own (as Accelerate's
            plugin shards the embeddings). MergeError: merged adapters. QuantizationError: a
            bitsandbytes 4-bit base. The model is unchanged then.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if cm.programs.sharding is not None:
        raise PeftcError("this compiled model is sharded already; call peftc.distributed.fully_shard once")
    if cm.merged:
        raise MergeError("FSDP can't shard merged weights and keep the merge undoable: unmerge() first, then "
                         "shard (or merge_and_unload() and shard the plain model)")
    packed = [name for name, p in cm.base_model.named_parameters()
              if type(p) not in (nn.Parameter, torch.Tensor) and not is_sharded(p)]
    if packed:
        raise QuantizationError(f"FSDP2 can't shard bitsandbytes' packed 4-bit weights ({packed[0]} is a "
                                f"{type(cm.base_model.get_parameter(packed[0])).__name__}): compile without "
                                "quantize= to shard the float base, or train QLoRA on one device")
    mesh = _mesh(mesh, cm)
    model = cm.base_model
    units = _layers(model, layers)
    if isinstance(cm, FSDPModule) and not all(isinstance(layer, FSDPModule) for layer in units.values()):
        raise PeftcError("torch's fully_shard(cm) was applied to the root before its layers: the root's unit holds "
                         "every weight and gathers all of them at once (accelerator.prepare does so when its FSDP2 "
                         "plugin wraps no layer). Compile again and call peftc.distributed.fully_shard(cm) first: it "
                         "shards both, and accelerator.prepare keeps its units")
    others = [name for name, m in model.named_modules() if isinstance(m, FSDPModule) and name not in units]
    if others:
        raise PeftcError(f"{others[0] or type(model).__name__} was sharded as an FSDP unit of its own (Accelerate's "
                         "FSDP2 plugin shards the embeddings and the final norm and head so): the graph would read "
                         "its weights outside that unit's hooks. Compile again and call "
                         "peftc.distributed.fully_shard(cm) before accelerator.prepare, which then keeps its units")
    cm.programs.set_sharding(Sharding(model, units, lambda: _gathered(cm)))  # raises for a compiled backend
    originals = [p for program in cm.programs for p in program.gm.parameters()]
    originals += [p for t in cm.programs.traces() for p in t.ep.state_dict.values()]
    options = {"mesh": mesh, **fsdp_options}
    for layer in units.values():  # units sharded already (the user's own calls, Accelerate's) are kept
        if not isinstance(layer, FSDPModule):
            torch_fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    if not isinstance(cm, FSDPModule):
        torch_fully_shard(cm, **options)
    _free_originals(originals, cm)
    return cm


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (one rank's shard of a whole tensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gathered_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor's full tensor (a collective: every rank must ask), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def writes_files() -> bool:
    """Whether this process writes checkpoints: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _mesh(mesh, cm):
    """The mesh to shard over, checked against the process group and the parameters' device."""
    if not (dist.is_available() and dist.is_initialized()):
        raise PeftcError("FSDP needs a process group: launch with torchrun and call "
                         "torch.distributed.init_process_group('gloo' or 'nccl') before sharding")
    world = dist.get_world_size()
    device = next(cm.base_model.parameters()).device.type
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device, (world,))
    if mesh.ndim != 1 or mesh.size() != world:
        raise PeftcError(f"the mesh {tuple(mesh.shape)} doesn't fit the process group of {world} ranks: peftc "
                         f"shards over one dimension spanning every rank; pass init_device_mesh({device!r}, "
                         f"({world},)) or mesh=None")
    if mesh.device_type != device:
        raise PeftcError(f"the mesh is on {mesh.device_type!r} but the model's parameters are on {device!r}: "
                         f"move the model there first, or build the mesh with device_type={device!r}")
    return mesh


def _layers(model: nn.Module, pattern: str | None) -> dict[str, nn.Module]:
    """The outermost modules to shard one by one, by path, in module order."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        hit = (bool(name) and re.fullmatch(pattern, name) is not None if pattern is not None
               else any(c.__name__ in classes for c in type(module).__mro__))  # FSDP<class> too
        if hit and not any(name.startswith(outer + ".") for outer in chosen):
            chosen[name] = module
    if not chosen:
        how = (f"no module path matches layers={pattern!r}" if pattern is not None else
               f"{type(model).__name__} lists no layer classes in _no_split_modules")
        raise PeftcError(f"FSDP found no layer to shard: {how}; pass layers=<a regular expression over module "
                         r"paths>, such as layers=r'model\.layers\.\d+'")
    return chosen


@contextlib.contextmanager
def _gathered(cm):
    """Every FSDP unit of ``cm`` gathered (plain, whole parameters) inside the block, for tracing."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in cm.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _free_originals(originals, cm) -> None:
    """Free the storage of the whole parameters FSDP2 replaced by shards: the traces ``compile``
    made still hold them (they are read no more: graphs read the live modules now)."""
    live = {t.untyped_storage().data_ptr() for p in (*cm.parameters(), *cm.buffers())
            for t in ([p.to_local()] if is_sharded(p) else [p])}
    for p in originals:
        if not is_sharded(p) and p.untyped_storage().data_ptr() not in live:
            p.untyped_storage().resize_(0)
