"""Where a training step's peak memory goes: torch.profiler's memory timeline, by category.

    python benchmarks/step_memory.py [--layers 4 --hidden 512 --seq 256 --batch 4 --vocab 32000]
        [--no-checkpointing]

The same model and LoRA config as ``train_step.py`` (a random-weight Llama,
LoRA r=16 alpha=32 on all seven projections, AdamW), eager, gradient
checkpointing on in every run by default. For the frozen base, PEFT and peftc
(each with one warm-up step first), one step runs under ``torch.profiler`` with
``profile_memory=True``; ``export_memory_timeline`` sorts every live tensor
into torch's categories (parameters, optimizer state, inputs, temporaries,
activations, gradients, autograd detail, unknown). The table gives, at the
moment of each run's peak, the bytes of each category, and "step" = the peak
less what was there before the step (parameters, optimizer state, the batch
and, for peftc, the base weights its graph takes as inputs), with the ratio to
PEFT. These are live tensor bytes; ``train_step.py``'s "peak MB" is the process's
resident memory, which also counts the allocator's slack and everything
outside tensors.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import PROJECTIONS, step
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

# export_memory_timeline's columns after the time: torch.profiler._memory_profiler's category order
CATEGORIES = ["parameter", "optimizer", "input", "temporary", "activation", "gradient", "autograd", "unknown"]
BEFORE_STEP = {"parameter", "optimizer", "input"}  # present before the step starts


def peak_by_category(model, batch) -> dict[str, float]:
    """MiB of each category at the peak of one profiled step (after one warm-up step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device = torch.device("cpu")
    step(model, optimizer, batch, device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(model, optimizer, batch, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    at_peak = max(sizes, key=lambda row: sum(row[1:]))[1:]
    return {name: n / 2**20 for name, n in zip(CATEGORIES, at_peak, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    import peft

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=(args.hidden * 8 // 3 + 63) // 64 * 64, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).train()
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    checkpointing = not args.no_checkpointing

    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.model.layers[0].input_layernorm.weight.requires_grad_(True)  # backward through every layer
    with_peft = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora)).train()
    with_peftc = peftc.compile(copy.deepcopy(base), lora, example_inputs=batch, backend="eager").train()
    runs = {"frozen base": frozen, "PEFT": with_peft, "peftc": with_peftc}
    if checkpointing:
        frozen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with_peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with_peftc.gradient_checkpointing_enable()
    peaks = {name: peak_by_category(model, batch) for name, model in runs.items()}

    print(f"Llama layers={args.layers} hidden={args.hidden} vocab={args.vocab}, batch {args.batch}x{args.seq}, "
          f"LoRA r=16 on 7 projections, eager, checkpointing {'on' if checkpointing else 'off'}; MiB at the peak")
    print(f"{'run':<12}" + "".join(f"{c:>11}" for c in CATEGORIES) + f"{'total':>9}{'step':>9}{'/PEFT':>7}")
    steps = {name: sum(v for c, v in p.items() if c not in BEFORE_STEP) for name, p in peaks.items()}
    for name, p in peaks.items():
        print(f"{name:<12}" + "".join(f"{p[c]:>11.1f}" for c in CATEGORIES)
              + f"{sum(p.values()):>9.1f}{steps[name]:>9.1f}{steps[name] / steps['PEFT']:>6.2f}x")


if __name__ == "__main__":
    main()
