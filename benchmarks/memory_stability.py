"""Resident memory over many lifecycle cycles: switch, merge, unmerge, and calls of many shapes.

    python benchmarks/memory_stability.py [--cycles 1000] [--every 100]

A small Llama (random weights) with two LoRA adapters, run eagerly (the graph
module, no inductor: what grows would be peftc's, not a compiler cache). Each
cycle switches the active adapter, merges, calls, unmerges, and calls with a
batch and sequence length drawn from 1..8 and 1..64 (every shape reuses one
trace: those dims are symbolic). Prints the process's resident set size every
``--every`` cycles, and the growth from the first report to the last, with
the number of programs the model holds (the signature cache, bounded by
``peftc.program.MAX_SIGNATURES``).
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc


def rss_mb() -> float:
    """The resident set size, from ``/proc/self/status`` (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    cm = peftc.compile(model, [peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj"))], backend="eager")
    cm.add_adapter("other", [peftc.LoRA(r=8, init=False).on(peftc.linear(r".*mlp\..*"))])
    rng = random.Random(0)
    reports = []
    start = time.perf_counter()
    with torch.no_grad():
        for cycle in range(1, args.cycles + 1):
            cm.set_adapter("other" if cycle % 2 else "default")
            cm.merge(progress=False)
            cm(input_ids=torch.randint(0, 512, (2, 16)))
            cm.unmerge(progress=False)
            cm(input_ids=torch.randint(0, 512, (rng.randint(1, 8), rng.randint(1, 64))))
            if cycle % args.every == 0:
                gc.collect()
                reports.append((cycle, rss_mb(), len(cm.programs)))
                print(f"cycle {cycle:5d}: RSS {reports[-1][1]:8.1f} MB, programs {reports[-1][2]}, "
                      f"{time.perf_counter() - start:6.1f} s", flush=True)
    (c0, m0, _), (c1, m1, _) = reports[0], reports[-1]
    print(f"growth from cycle {c0} to {c1}: {m1 - m0:+.1f} MB ({(m1 - m0) / max(c1 - c0, 1) * 1024:+.2f} KB/cycle)")


if __name__ == "__main__":
    main()
