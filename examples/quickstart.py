"""Quickstart: LoRA on a small Llama, trained, merged, and saved in PEFT's format.

    python examples/quickstart.py [--steps 200] [--backend eager|inductor] [--out out/quickstart-adapter]

The model is built from a config (random weights: there is no model hub here)
and learns a synthetic task: each next token is the previous one plus 3, mod 97.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

VOCAB, STRIDE = 97, 3


def batch(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    return (start + STRIDE * torch.arange(length)) % VOCAB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend; default: inductor on CUDA, eager on CPU "
                             "(inductor on a 2-core CPU spends about 2 minutes compiling)")
    parser.add_argument("--out", default="out/quickstart-adapter")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend or ("inductor" if device == "cuda" else "eager")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    # 1. A small Llama-architecture model.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(device)

    # 2. Compile it with LoRA rules: attention projections everywhere, MLP in the first two layers.
    rules = [
        peftc.LoRA(r=16, alpha=32, dropout=0.05).on(peftc.linear(r".*\.(q|k|v|o)_proj")),
        peftc.LoRA(r=8, alpha=16, dropout=0.05).on(peftc.linear(r".*mlp\..*", layers=range(0, 2))),
    ]
    example = batch(8, 32, gen).to(device)
    t0 = time.perf_counter()
    cm = peftc.compile(model, rules, example_inputs={"input_ids": example}, backend=backend)
    print(f"compiled {type(model).__name__} with backend={backend!r}: {len(cm.sites)} LoRA sites "
          f"in {time.perf_counter() - t0:.1f}s")
    cm.print_trainable_parameters()

    # 3. Train the adapters only.
    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    cm.train()
    bar = tqdm(range(args.steps), desc="training", unit="step", mininterval=2.0)
    first = None
    for step in bar:
        ids = batch(16, 32, gen).to(device)
        loss = cm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
            tqdm.write(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"loss {first:.3f} -> {loss.item():.3f}")

    # 4. Merge into the weights; the merged graph is the base graph again.
    cm.eval()
    ids = batch(4, 24, gen).to(device)
    with torch.no_grad():
        unmerged = cm(input_ids=ids).logits
        cm.merge(safe=True)
        merged = cm(input_ids=ids).logits
    adapter_nodes = sum("peftc" in n.meta for n in cm.graph_module(input_ids=ids).graph.nodes)
    diff = (merged - unmerged).abs().max().item()
    print(f"merged vs unmerged logits: max |diff| = {diff:.2e}; adapter nodes left in the graph: {adapter_nodes}")
    assert diff < 1e-4, "merged and unmerged outputs disagree"
    cm.unmerge()

    # 5. Save the adapter in PEFT's format.
    cm.save_pretrained(args.out)
    print(f"saved the adapter to {args.out}/ (adapter_config.json + adapter_model.safetensors)")


if __name__ == "__main__":
    main()
