"""Generation speed, side by side in one run: peftc vs PEFT vs the merged base model.

Prints tokens per second (median of ``--repeats`` rounds, the rows timed in turn
in each round, after a warm-up run that also compiles) for batch 1 and batch 8 on
a Llama-shaped model with LoRA r=16 on q/k/v/o, greedy, ``--new-tokens`` new
tokens, and the ratios the issue's targets name:

- peftc compiled vs PEFT's ``generate`` (target >= 1.0);
- the compiled merged base vs peftc compiled, unmerged (target <= 1.15);
- peftc's mixed batch over 4 LoRA adapters vs PEFT's (target >= 2.0).

    python benchmarks/generate.py                  # CPU-sized model
    python benchmarks/generate.py --hidden 1024 --layers 8 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peftc


def build(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=(args.hidden * 8 // 3 + 63) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(args.hidden // 256, 1), max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(args.device, args.dtype).eval()


def lora(seed: int) -> LoraConfig:
    return LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)


def timed(rows: dict, repeats: int) -> dict[str, float]:
    """Median seconds per row, the rows timed in turn in each round (a busy machine slows them alike)."""
    for fn in rows.values():
        fn()  # warm-up (and compile)
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", type=lambda s: getattr(torch, s))
    args = parser.parse_args()

    base = build(args)
    folder = tempfile.mkdtemp()
    pm = get_peft_model(copy.deepcopy(base), lora(0)).eval()
    for i in range(1, 4):  # four adapters for the mixed batch
        torch.manual_seed(i)
        pm.add_adapter(f"a{i}", lora(i))
    pm.save_pretrained(folder)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    for i in range(1, 4):
        pm.load_adapter(f"{folder}/a{i}", f"a{i}")
    eager = peftc.from_pretrained(copy.deepcopy(base), folder, backend="eager")
    compiled = peftc.from_pretrained(copy.deepcopy(base), folder)
    for cm in (eager, compiled):
        for i in range(1, 4):
            cm.load_adapter(f"{folder}/a{i}", f"a{i}")
    merged = peftc.from_pretrained(copy.deepcopy(base), folder, backend="eager").merge_and_unload()
    merged_compiled = copy.deepcopy(merged)
    merged_compiled.forward = torch.compile(merged_compiled.forward, dynamic=True)

    def gen(model, ids, **kw):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **kw)

    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, {args.device}; "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, LoRA r=16 on q/k/v/o; tokens/s, median of {args.repeats}")
    names = [f"a{i % 4}".replace("a0", "default") for i in range(8)]
    for batch in (1, 8):
        ids = torch.randint(1, args.vocab, (batch, args.prompt), device=args.device)
        rows = {
            "peftc eager": lambda ids=ids: gen(eager, ids),
            "peftc compiled": lambda ids=ids: gen(compiled, ids),
            "PEFT generate": lambda ids=ids: gen(pm, ids),
            "merged base eager": lambda ids=ids: gen(merged, ids),
            "merged base compiled": lambda ids=ids: gen(merged_compiled, ids, cache_implementation="static"),
        }
        if batch == 8:
            rows["peftc compiled, 4 adapters mixed"] = lambda ids=ids: gen(compiled, ids, adapter_names=names)
            rows["PEFT, 4 adapters mixed"] = lambda ids=ids: gen(pm, ids, adapter_names=names)
        speed = {name: batch * args.new_tokens / seconds for name, seconds in timed(rows, args.repeats).items()}
        print(f"\nbatch {batch}")
        for name, value in speed.items():
            print(f"  {name:36s} {value:10.1f}")
        print(f"  peftc compiled / PEFT generate        {speed['peftc compiled'] / speed['PEFT generate']:.2f}x (target >= 1)")
        print(f"  merged compiled / peftc compiled      "
              f"{speed['merged base compiled'] / speed['peftc compiled']:.2f}x (target <= 1.15)")
        if batch == 8:
            ratio = speed["peftc compiled, 4 adapters mixed"] / speed["PEFT, 4 adapters mixed"]
            print(f"  peftc mixed / PEFT mixed              {ratio:.2f}x (target >= 2)")


if __name__ == "__main__":
    main()
