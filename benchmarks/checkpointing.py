"""Gradient checkpointing: bytes backward holds and time per step, peftc vs. PEFT, off and on, in one run.

    python benchmarks/checkpointing.py [--steps 10] [--hidden 256] [--layers 4] [--compile]

The same Llama-architecture model (random weights) and LoRA config under PEFT
(transformers' per-layer ``torch.utils.checkpoint``) and peftc (the
``passes/checkpoint.py`` regions), each with checkpointing off and on.
Memory: ``peftc.testing.held_bytes`` of one forward (what backward keeps,
parameters not counted; for PEFT the checkpointed layers' keyword inputs too).
Time: forward + backward + AdamW step on the same batches, the runs interleaved
step by step; medians after warm-up, and the ratio to PEFT without checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc
from peftc.testing import held_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also peftc with inductor (slow to compile on CPU)")
    args = parser.parse_args()
    import peft

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=args.seq)
    base = LlamaForCausalLM(config).train()
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           init_lora_weights=False)
    backends = ["eager"] + (["inductor"] if args.compile else [])
    runs, layers = {}, {}
    for on in (False, True):
        pm = peft.get_peft_model(copy.deepcopy(base), lora).train()
        if on:
            pm.gradient_checkpointing_enable()
            layers[f"PEFT, checkpointing {'on' if on else 'off'}"] = list(pm.get_base_model().model.layers)
        runs[f"PEFT, checkpointing {'on' if on else 'off'}"] = pm
        for backend in backends:
            cm = peftc.compile(copy.deepcopy(base), lora, backend=backend).train()
            if on:
                cm.gradient_checkpointing_enable()
            runs[f"peftc ({backend}), checkpointing {'on' if on else 'off'}"] = cm
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1024, (args.batch, args.seq), generator=gen) for _ in range(args.steps + args.warmup)]
    mask = torch.ones_like(batches[0])
    mask[0, : args.seq // 4] = 0  # padding: both build an attention mask
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i, ids in enumerate(batches):
        for name, model in runs.items():
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    held = {name: held_bytes(m, lambda m=m: m(input_ids=batches[0], attention_mask=mask, labels=batches[0]),
                             layers.get(name, ())) for name, m in runs.items()}
    ref_t, ref_b = statistics.median(times["PEFT, checkpointing off"]), held["PEFT, checkpointing off"]
    width = max(len(n) for n in runs)
    print(f"\n{torch.get_num_threads()} threads; Llama hidden={args.hidden} layers={args.layers} "
          f"batch={args.batch}x{args.seq}; LoRA r=16 on q,k,v,o; {args.steps} steps")
    print(f"{'run':<{width}}  {'held MB':>8} {'ratio':>6}  {'ms/step':>8} {'ratio':>6}")
    for name in runs:
        t = statistics.median(times[name])
        print(f"{name:<{width}}  {held[name] / 1e6:8.2f} {held[name] / ref_b:5.2f}x  {t:8.1f} {t / ref_t:5.2f}x")


if __name__ == "__main__":
    main()
