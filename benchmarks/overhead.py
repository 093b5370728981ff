"""Training-step time and memory: peftc vs. Hugging Face PEFT, side by side in one run.

    python benchmarks/overhead.py [--steps 20] [--compile] [--hidden 256] [--layers 4]

Both wrap the same Llama-architecture model (random weights, built from a
config) with the same LoRA config, run forward + backward + AdamW step on the
same batches, alternating between the two so that machine noise hits both.
Prints median milliseconds per step and the ratio to PEFT. ``--compile`` adds
peftc lowered with inductor, and PEFT under ``torch.compile(fullgraph=True)``
(reported as failing if it can't compile as one graph).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc


def step_fn(model, params):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time inductor (slow to compile on CPU)")
    args = parser.parse_args()
    import peft

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=args.seq)
    base = LlamaForCausalLM(config).to(device).train()
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           init_lora_weights=False)
    runs = {"PEFT (eager)": peft.get_peft_model(copy.deepcopy(base), lora).train()}
    runs["peftc (eager)"] = peftc.compile(copy.deepcopy(base), lora, backend="eager").train()
    if args.compile:
        runs["peftc (inductor)"] = peftc.compile(copy.deepcopy(base), lora, backend="inductor").train()
        try:
            model = peft.get_peft_model(copy.deepcopy(base), lora).train()
            runs["PEFT (compile fullgraph)"] = torch.compile(model, fullgraph=True)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            print(f"PEFT + torch.compile(fullgraph=True) failed to build: {type(e).__name__}")
    steps = {name: step_fn(m, [p for p in m.parameters() if p.requires_grad]) for name, m in runs.items()}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1024, (args.batch, args.seq), generator=gen).to(device)
               for _ in range(args.steps + args.warmup)]
    times: dict[str, list[float]] = {name: [] for name in steps}
    failed: dict[str, str] = {}
    for i, ids in enumerate(batches):
        for name, step in steps.items():
            if name in failed:
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                step(ids)
            except Exception as e:  # noqa: BLE001 - e.g. PEFT's graph breaks under fullgraph
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    ref = statistics.median(times["PEFT (eager)"])
    name_w = max(len(n) for n in steps)
    print(f"\ndevice: {device} ({torch.get_num_threads()} threads); Llama hidden={args.hidden} "
          f"layers={args.layers} batch={args.batch}x{args.seq}; LoRA r=16 on q,k,v,o; {args.steps} steps")
    print(f"{'run':<{name_w}}  median ms/step  ratio to PEFT (eager)")
    for name, ts in times.items():
        if name in failed:
            print(f"{name:<{name_w}}  failed: {failed[name]}")
        else:
            med = statistics.median(ts)
            print(f"{name:<{name_w}}  {med:14.1f}  {med / ref:6.2f}x")


if __name__ == "__main__":
    main()
