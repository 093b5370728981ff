"""One training step (forward, backward, AdamW) side by side: frozen base, PEFT, peftc; eager and compiled.

    python benchmarks/train_step.py [--layers 4 --hidden 512 --seq 256 --batch 4 --vocab 32000]
        [--steps 5] [--checkpointing] [--ablate [--ablate-compiled]] [--device cuda --dtype bfloat16] [--only eager]
        [--profile 25] [--cold-first]

A Llama-architecture model (random weights), LoRA r=16 alpha=32 on all seven
projections. Runs:

- frozen base: no adapter; only layer 0's input-norm weight trains, so backward
  runs through every layer as it does for LoRA (the floor);
- PEFT: ``get_peft_model``, and ``torch.compile(model)`` of it;
- peftc: ``peftc.compile(backend="eager")`` and ``backend="inductor"`` (defaults:
  the fused LM-head loss on);
- ``--ablate``: peftc eager with the fused loss off and with ``fuse_lora_a`` on,
  and peftc inductor with ``dynamic=None``; ``--ablate-compiled``: the two
  switches compiled too.

Each run gets the same batches, the runs interleaved step by step so machine
noise hits all of them; medians after one warm-up step. "first s" is the time
from building the run (get_peft_model / peftc.compile / torch.compile) to the
end of its first step: trace plus compile (``--cold-first``: measured for each
compiled run in a fresh process with an empty inductor cache, so that no run
reuses kernels or warm-up an earlier one paid for). "peak MB" is the step's peak memory
above what was resident before it: ``torch.cuda.max_memory_allocated`` on a GPU;
on a Linux CPU the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` after ``malloc_trim``) minus its RSS before the step.
``--checkpointing`` turns gradient checkpointing on in every run.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="default: hidden * 8 / 3, rounded to 64")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--ablate", action="store_true",
                        help="also peftc with each pass switched (eager) and compiled with dynamic=None")
    parser.add_argument("--ablate-compiled", action="store_true", help="the pass switches compiled too (slow)")
    parser.add_argument("--only", choices=["eager", "compiled"], default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile one more step of each run (torch.profiler) and print its N costliest ops")
    parser.add_argument("--cold-first", action="store_true",
                        help="time each compiled run's first step in a process of its own with an empty inductor cache")
    parser.add_argument("--first-only", default=None, help=argparse.SUPPRESS)  # the child --cold-first runs
    args = parser.parse_args()
    import peft

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    intermediate = args.intermediate or (args.hidden * 8 // 3 + 63) // 64 * 64
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device, dtype).train()
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)
    checkpoint_kwargs = {"use_reentrant": False}

    def frozen(compiled: bool):
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        model.model.layers[0].input_layernorm.weight.requires_grad_(True)
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
        return torch.compile(model) if compiled else model

    def with_peft(compiled: bool):
        model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora)).train()
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
        return torch.compile(model) if compiled else model

    def with_peftc(backend: str, optimize: peftc.Optimize | None = None):
        def build(_compiled):
            model = peftc.compile(copy.deepcopy(base), lora, example_inputs=batches[0], backend=backend,
                                  optimize=optimize).train()
            if args.checkpointing:
                model.gradient_checkpointing_enable()
            return model
        return build

    builders = {}
    if args.only != "compiled":
        builders |= {"frozen base eager": lambda: frozen(False), "PEFT eager": lambda: with_peft(False),
                     "peftc eager": lambda: with_peftc("eager")(False)}
    if args.only != "eager":
        builders |= {"frozen base compiled": lambda: frozen(True), "PEFT compiled": lambda: with_peft(True),
                     "peftc compiled": lambda: with_peftc("inductor")(True)}
        if args.ablate:
            builders["peftc compiled, dynamic=None"] = lambda: with_peftc("inductor", peftc.Optimize(dynamic=None))(1)
    if args.ablate:  # each pass switched, eager (cheap to build) and, with --ablate-compiled, compiled
        for backend, kind in (("eager", "eager"), ("inductor", "compiled")):
            if args.only == ("compiled" if kind == "eager" else "eager") or (kind == "compiled"
                                                                            and not args.ablate_compiled):
                continue
            for label, opt in (("fused loss off", peftc.Optimize(fused_loss=False)),
                               ("+fuse_lora_a", peftc.Optimize(fuse_lora_a=True))):
                builders[f"peftc {kind}, {label}"] = lambda b=backend, opt=opt: with_peftc(b, opt)(True)

    gen = torch.Generator().manual_seed(0)
    batches = [dict(input_ids=(ids := torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)),
                    labels=ids) for _ in range(args.steps + 1)]
    if args.first_only is not None:
        builders = {args.first_only: builders[args.first_only]}
    runs, optimizers, first = {}, {}, {}
    for name, build in builders.items():  # build and first step one at a time: compile time is its own
        t0 = time.perf_counter()
        runs[name] = build()
        built = time.perf_counter() - t0
        optimizers[name] = torch.optim.AdamW([p for p in runs[name].parameters() if p.requires_grad], lr=1e-5)
        step(runs[name], optimizers[name], batches[0], device)
        first[name] = time.perf_counter() - t0
        print(f"built {name} in {built:.1f} s; first step after {first[name]:.1f} s", flush=True)
    if args.first_only is not None:
        print(json.dumps(first[args.first_only]))
        return
    if args.cold_first:
        first |= {name: cold_first_step(name) for name in runs if "compiled" in name}
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, int] = {}
    for i, batch in enumerate(batches[1:]):
        for name, model in runs.items():
            if i == 0:
                peaks[name] = peak_bytes(lambda m=model, o=optimizers[name], b=batch: step(m, o, b, device), device)
                continue
            t0 = time.perf_counter()
            step(model, optimizers[name], batch, device)
            times[name].append(time.perf_counter() - t0)
    print(f"\n{device} {args.dtype}, {torch.get_num_threads()} threads; Llama layers={args.layers} "
          f"hidden={args.hidden} intermediate={intermediate} vocab={args.vocab}, batch {args.batch}x{args.seq}; "
          f"LoRA r=16 on 7 projections; checkpointing {'on' if args.checkpointing else 'off'}; "
          f"median of {args.steps - 1} steps")
    width = max(len(n) for n in runs)
    print(f"{'run':<{width}}  {'ms/step':>8} {'/PEFT':>6} {'/base':>6}  {'tok/s':>8}  {'peak MB':>8} {'/PEFT':>6}"
          f"  {'first s':>7} {'/PEFT':>6}")
    for name in runs:
        kind = "compiled" if "compiled" in name else "eager"
        t, ref_t, base_t = (statistics.median(times[n]) for n in (name, f"PEFT {kind}", f"frozen base {kind}"))
        tok = args.batch * args.seq / t
        print(f"{name:<{width}}  {t * 1000:8.1f} {t / ref_t:5.2f}x {t / base_t:5.2f}x  {tok:8.0f}  "
              f"{peaks[name] / 2**20:8.1f} {peaks[name] / peaks[f'PEFT {kind}']:5.2f}x  "
              f"{first[name]:7.1f} {first[name] / first[f'PEFT {kind}']:5.2f}x")
    for name, model in runs.items() if args.profile else ():
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                              if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            step(model, optimizers[name], batches[-1], device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n{name}: one step under torch.profiler, the {args.profile} costliest ops by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=60))


def cold_first_step(name: str) -> float:
    """Seconds from building run ``name`` to the end of its first step, in a new process whose inductor
    cache is empty: no run gains from kernels or warm-up an earlier one paid for."""
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, *sys.argv, "--first-only", name], check=True, capture_output=True,
                             text=True, env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}).stdout
    seconds = json.loads(out.strip().splitlines()[-1])
    print(f"{name}: first step after {seconds:.1f} s in a fresh process, empty inductor cache", flush=True)
    return seconds


def step(model, optimizer, batch, device) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, device) -> int:
    """The peak memory ``fn()`` takes above what was resident before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - before
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)  # freed heap back to the system: RSS is what is live
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    fn()
    return _status("VmHWM") - before


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


if __name__ == "__main__":
    main()
