"""FSDP2: LoRA on a small Llama whose base is sharded over the ranks, layer by layer.

    torchrun --nproc_per_node=2 examples/fsdp.py [--steps 50] [--out out/fsdp-adapter]

Each rank holds half of every base weight; ``peftc.distributed.fully_shard``
makes the graph gather a layer's weights just before the layer runs and free
them just after (torch's FSDP2 hooks). Every rank trains on its own batches;
the adapters' gradients are averaged over the ranks. On GPUs the process group
is NCCL and each rank uses its own device; on CPUs it is gloo.

The model is built from a config (random weights: there is no model hub here)
and learns a synthetic task: each next token is the previous one plus 3, mod 97.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

VOCAB, STRIDE = 97, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="out/fsdp-adapter")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same base weights on every rank
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).to(device)

    cm = peftc.compile(model, peftc.LoRA(r=8, alpha=16).on(peftc.linear(r".*\.(q|k|v|o)_proj")), backend="eager")
    whole = sum(p.numel() for p in model.parameters())
    peftc.distributed.fully_shard(cm)  # every decoder layer, then the root: embeddings, norm, head, adapters
    held = sum(p.to_local().numel() for p in model.parameters())
    if rank == 0:
        print(f"{world} ranks; base weights held by rank 0: {held:,d} of {whole:,d}")

    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    cm.train()
    for step in range(args.steps):
        start = torch.randint(0, VOCAB, (8, 1), generator=generator)
        ids = ((start + STRIDE * torch.arange(16)) % VOCAB).to(device)
        loss = cm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}")

    cm.save_pretrained(args.out)  # every rank gathers the adapters; rank 0 writes the PEFT folder
    if rank == 0:
        print(f"saved the adapter to {args.out} (PeftModel.from_pretrained loads it)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
