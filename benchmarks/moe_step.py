"""One training step on a mixture of experts, side by side: PEFT and peftc, LoRA on every expert.

    python benchmarks/moe_step.py [--layers 2 --hidden 256 --intermediate 512 --experts 8 --top-k 2
        --seq 128 --batch 4 --vocab 8000 --steps 5 --experts-implementation grouped_mm]

A Mixtral-architecture model (random weights), ``LoraConfig(r=16, lora_alpha=32,
target_modules="all-linear")``: attention, the routers, and every expert of the fused
``gate_up_proj`` / ``down_proj`` stacks (PEFT's ``target_parameters``). Runs, eager both:

- PEFT: ``get_peft_model`` (its ParamWrapper adds ``scaling * B A`` to each stack per forward);
- peftc: ``peftc.compile(backend="eager")`` (the graph reads ``W + scaling * B A`` at each stack).

A step is forward, backward and AdamW. Both runs get the same batches, interleaved
step by step; medians after one warm-up step, and the median of the per-step ratios
(steps run back to back, so a busy machine slows both sides of a ratio alike). Both adapters start equal, and the
first step's losses are printed to show it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import peftc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "batched_mm"])
    args = parser.parse_args()

    import peft
    from peft import LoraConfig

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                           max_position_embeddings=2 * args.seq)
    base = MixtralForCausalLM(config)
    base.set_experts_implementation(args.experts_implementation)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    cm = peftc.compile(base, lora, backend="eager")
    theirs = peft.get_peft_model_state_dict(pm)
    with torch.no_grad():
        for key, tensor in peftc.formats.peft.adapter_tensors(cm, "default").items():
            tensor.copy_(theirs[key])
    runs = {"PEFT": pm, "peftc": cm}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in runs.items()}
    print(f"trainable: PEFT {pm.get_nb_trainable_parameters()[0]:,d}, peftc {cm.get_nb_trainable_parameters()[0]:,d}")

    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps + 1):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(step))
        for name, model in runs.items():
            model.train()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if step == 0:
                print(f"{name}: first loss {loss.item():.6f}")
            else:
                times[name].append(elapsed)
    ref = statistics.median(times["PEFT"])
    print(f"{'run':8s} {'median s':>9s} {'vs PEFT':>8s} {'step ratio':>11s}")
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["PEFT"], strict=True))
        print(f"{name:8s} {statistics.median(ts):9.3f} {statistics.median(ts) / ref:7.2f}x {ratio:10.2f}x")


if __name__ == "__main__":
    main()
