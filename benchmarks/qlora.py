"""QLoRA: peftc's 4-bit base vs. Hugging Face PEFT's QLoRA, side by side in one run.

    PYTHONPATH=. python benchmarks/qlora.py [--layers 6] [--hidden 1024] [--steps 5] [--compile]

A Llama-shaped model (random weights, default 6 layers of hidden 1024 and a
32000-token vocabulary: ~142M parameters) is quantized to NF4 with double
quantization, every linear but the head, and gets LoRA r=16 on q/k/v/o.
Each variant runs in a process of its own, so that its peak memory is its own:

- ``PEFT``: transformers-style ``Linear4bit`` modules (the same quantization),
  ``prepare_model_for_kbit_training`` (no checkpointing) + ``get_peft_model``;
- ``PEFT (inductor)``: the same, under ``torch.compile`` (with ``--compile``);
- ``peftc (eager)`` / ``peftc (inductor)``: ``peftc.compile(model, lora, quantize="nf4")``.

Prints the bytes of the quantized linear weights against their float32 bytes,
the peak resident memory of a training step above the resident memory before
it (model and optimizer state loaded; Linux ``VmHWM``, reset before the step), and the median time of a training step (forward, backward,
AdamW), with ratios to PEFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=args.seq)
    return LlamaForCausalLM(config).train()


def _rss_mb(field: str = "VmRSS") -> float:
    """The process's resident memory (``VmHWM``: its peak since :func:`_reset_peak`), in MiB (Linux)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def run_variant(name: str, args) -> dict:
    import peft

    import peftc
    from peftc.quantization import Quantize, quantize_modules
    from peftc.storage import is_packed, parts

    model = _model(args)
    n_params = sum(p.numel() for p in model.parameters())
    linear_fp32 = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n != "lm_head")
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           init_lora_weights=False)
    if name.startswith("PEFT"):  # the same Linear4bit modules peftc's quantize= makes
        spec = Quantize("nf4")
        quantize_modules(model, spec, [n for n, m in model.named_modules()
                                       if isinstance(m, torch.nn.Linear) and n != "lm_head"])
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, lora).train()
        if "inductor" in name:
            model = torch.compile(model)
    else:
        model = peftc.compile(model, lora, backend="inductor" if "inductor" in name else "eager",
                              quantize="nf4").train()
    packed = sum(t.numel() * t.element_size() for p in model.parameters() if is_packed(p)
                 for t in parts(p).values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # first step: compiles (inductor), allocates optimizer state
    before = _rss_mb()
    _reset_peak()
    step()
    peak = _rss_mb("VmHWM") - before
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"params": n_params, "linear_fp32": linear_fp32, "packed": packed, "peak_mb": peak,
            "ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="also PEFT under torch.compile and peftc lowered with inductor (slow on CPU)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    names = ["PEFT", "peftc (eager)"] + (["PEFT (inductor)", "peftc (inductor)"] if args.compile else [])
    results = {}
    for name in names:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", name],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results["PEFT"]
    print(f"model: {ref['params'] / 1e6:.0f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"batch {args.batch}x{args.seq}, {args.steps} timed steps (median)")
    print(f"quantized linear weights: {ref['packed'] / 2**20:.1f} MiB vs {ref['linear_fp32'] / 2**20:.1f} MiB "
          f"float32 ({ref['packed'] / ref['linear_fp32']:.3f}x)")
    print(f"{'variant':<18} {'packed MiB':>10} {'step peak MiB':>14} {'ratio':>6} {'step ms':>9} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<18} {r['packed'] / 2**20:>10.1f} {r['peak_mb']:>14.0f} {r['peak_mb'] / ref['peak_mb']:>6.2f} "
              f"{r['ms']:>9.0f} {r['ms'] / ref['ms']:>6.2f}")


if __name__ == "__main__":
    main()
