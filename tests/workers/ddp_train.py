"""Run by tests/test_distributed.py under torchrun: LoRA on a tiny Llama, trained with DDP (gloo).

Each rank trains on its half of a fixed global batch; rank r writes its final adapter
weights and losses to ``<out>/rank<r>.safetensors``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's builders
from conftest import make_llama  # noqa: E402

import peftc  # noqa: E402


def main(out: Path, steps: int = 3) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cm = peftc.compile(make_llama(), peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj")),
                       backend="eager").train()
    model = DistributedDataParallel(cm)
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(1, 100, (4 * world, 10), generator=torch.Generator().manual_seed(0))
    mine = ids.chunk(world)[rank]
    losses = []
    for _ in range(steps):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    tensors = {n: p.detach().contiguous() for n, p in cm.named_parameters() if p.requires_grad}
    tensors["losses"] = torch.stack(losses)
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
