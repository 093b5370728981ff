"""Run by tests/test_distributed.py under torchrun: LoRA on a tiny Llama, sharded with FSDP2
(``peftc.distributed.fully_shard``, gloo).

Each rank trains on its half of a fixed global batch and writes, to ``<out>/rank<r>.safetensors``,
its losses, the whole (gathered) adapter weights, and what it measured of its memory: the bytes
of base weights it holds, counted over every tensor reachable from the model and its graphs
(each storage once); ``cm.save_pretrained(<out>/adapter)`` writes the PEFT folder from rank 0.
Options after the folder: ``checkpointing`` (gradient checkpointing on).
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


def main(out: Path, options: list[str], steps: int = 3) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cm = peftc.compile(make_llama(), peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj")),
                       backend="eager").train()
    if "checkpointing" in options:
        cm.gradient_checkpointing_enable()
    base = cm.base_model
    whole = sum(p.numel() * p.element_size() for p in base.parameters())
    layer = max(sum(p.numel() * p.element_size() for p in m.parameters()) for m in base.model.layers)
    peftc.distributed.fully_shard(cm)
    gathered = []  # per layer call in forward: bytes of whole (gathered) layer weights held at that moment

    def count(module, args):
        if torch.compiler.is_exporting():  # a new trace (train mode) runs with every unit gathered
            return
        gathered.append(sum(p.untyped_storage().nbytes() for m in base.model.layers for p in m.parameters()
                            if not is_sharded(p)))

    for m in base.model.layers:
        m.register_forward_pre_hook(count)  # after FSDP2's own pre-hook (which it prepends): gathered
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(1, 100, (4 * world, 10), generator=torch.Generator().manual_seed(0))
    mine = ids.chunk(world)[rank]
    losses = []
    for _ in range(steps):
        loss = cm(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    tensors = {n: gathered_tensor(p.detach()).contiguous() for n, p in cm.named_parameters() if p.requires_grad}
    tensors["losses"] = torch.stack(losses)
    tensors["memory"] = torch.tensor([resident_base_bytes(cm), whole, layer, max(gathered)])
    cm.save_pretrained(out / "adapter")
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
