"""Run by tests/test_fsdp.py under torchrun: LoRA on a tiny Llama, sharded with FSDP2
(``peftc.distributed.fully_shard``, gloo), three times in one launch: ``<out>/plain``; with gradient
checkpointing, ``<out>/checkpointing``; prepared by Accelerate's FSDP2 plugin, ``<out>/accelerate``.

Each rank trains on its half of a fixed global batch and writes, to ``<variant>/rank<r>.safetensors``,
its losses, the whole (gathered) adapter weights, and what it measured of its memory: the bytes
of base weights it holds, counted over every tensor reachable from the model and its graphs
(each storage once), at the end; ``cm.save_pretrained(<variant>/adapter)`` writes the PEFT folder
from rank 0. The plain variant then generates greedily on the trained sharded model (before the
memory count, so the generation graphs are counted too).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's builders
from conftest import make_llama  # noqa: E402

import peftc  # noqa: E402
from peftc.distributed import gathered_tensor, is_sharded  # noqa: E402


def storages(tensors) -> dict[int, int]:
    """data pointer -> bytes, of each tensor's storage (a DTensor's: its local shard's)."""
    out = {}
    for t in tensors:
        t = t.to_local() if is_sharded(t) else t
        out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def resident_base_bytes(cm) -> int:
    """Bytes of every tensor storage reachable from the model, its graphs and its traces, except
    the adapters' own."""
    reachable = {}
    for module in (cm, *(p.gm for p in cm.programs), *(p.fn for p in cm.programs)):
        reachable.update(storages([*module.parameters(), *module.buffers()]))
    for t in cm.programs.traces():
        reachable.update(storages(t.ep.state_dict.values()))
        reachable.update(storages(t.ep.constants.values()))
    adapters = storages([*cm.peftc.parameters(), *cm.peftc.buffers()])
    return sum(n for ptr, n in reachable.items() if ptr not in adapters and ptr != 0)


GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def prompts(world: int) -> torch.Tensor:
    """The global batch of prompts generate runs on (each rank its own half)."""
    return torch.randint(3, 100, (2 * world, 6), generator=torch.Generator().manual_seed(1))


def accelerate(cm, opt):
    """``accelerator.prepare(cm, opt)`` with Accelerate's FSDP2 plugin (its own preparation code); and
    the backward it wants called.

    Accelerate turns FSDP on only where the ranks have an accelerator (``accelerate/state.py``
    leaves CPU ranks at ``MULTI_CPU``, which prepares DDP), so on these CPU ranks the state is told
    FSDP after the fact: what ``prepare`` then runs (``_prepare_fsdp2``, ``fsdp2_prepare_model``,
    the optimizer's parameter switch) is Accelerate's own, unchanged."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    accelerator.state.distributed_type, accelerator.state.fsdp_plugin = DistributedType.FSDP, plugin
    assert accelerator.is_fsdp2
    prepared, opt = accelerator.prepare(cm, opt)
    assert prepared is cm
    return opt, accelerator.backward


def run(out: Path, checkpointing: bool = False, generating: bool = False, accelerated: bool = False,
        steps: int = 3) -> None:
    """Train one sharded model and write what it did under ``out``; with ``accelerated``, prepared by
    Accelerate after peftc sharded it; with ``generating``, then greedy generate on this rank's
    prompts, twice: the second time rank 0's rows all end on their first token (their own eos ids)
    while the other ranks go on."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cm = peftc.compile(make_llama(), peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj")),
                       backend="eager").train()
    if checkpointing:
        cm.gradient_checkpointing_enable()
    base = cm.base_model
    whole = sum(p.numel() * p.element_size() for p in base.parameters())
    layer = max(sum(p.numel() * p.element_size() for p in m.parameters()) for m in base.model.layers)
    peftc.distributed.fully_shard(cm)
    gathered = []  # per layer call in forward: bytes of whole (gathered) layer weights held at that moment

    def count(module, args):
        if torch.compiler.is_exporting():  # a new trace runs with every unit gathered
            return
        gathered.append(sum(p.untyped_storage().nbytes() for m in base.model.layers for p in m.parameters()
                            if not is_sharded(p)))

    for m in base.model.layers:
        m.register_forward_pre_hook(count)  # after FSDP2's own pre-hook (which it prepends): gathered
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    opt, backward = accelerate(cm, opt) if accelerated else (opt, torch.Tensor.backward)
    ids = torch.randint(1, 100, (4 * world, 10), generator=torch.Generator().manual_seed(0))
    mine = ids.chunk(world)[rank]
    losses = []
    for _ in range(steps):
        loss = cm(input_ids=mine, labels=mine).loss
        backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    tensors = {n: gathered_tensor(p.detach()).contiguous() for n, p in cm.named_parameters() if p.requires_grad}
    tensors["losses"] = torch.stack(losses)
    if generating:
        cm.eval()
        ask = prompts(world).chunk(world)[rank]
        with torch.no_grad():
            greedy = cm.generate(input_ids=ask, attention_mask=torch.ones_like(ask), **GREEDY)
            eos = greedy.sequences[:, ask.shape[1]].tolist() if rank == 0 else 2
            stopped = cm.generate(input_ids=ask, attention_mask=torch.ones_like(ask), **GREEDY, eos_token_id=eos)
        tensors["generated"], tensors["logits"] = greedy.sequences, torch.stack(greedy.logits, dim=1)
        tensors["stopped"] = stopped.sequences
    tensors["memory"] = torch.tensor([resident_base_bytes(cm), whole, layer, max(gathered)])
    cm.save_pretrained(out / "adapter")
    out.mkdir(parents=True, exist_ok=True)  # every rank: rank 0's save_pretrained may not have made it yet
    save_file(tensors, str(out / f"rank{rank}.safetensors"))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    run(out / "plain", checkpointing=False, generating=True)
    run(out / "checkpointing", checkpointing=True)
    run(out / "accelerate", accelerated=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
