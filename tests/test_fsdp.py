"""FSDP2 (``peftc.distributed.fully_shard``) under torchrun: two CPU processes (gloo) train a compiled
model whose base is sharded layer by layer; they equal one process on the global batch, hold half
the base, and save a PEFT adapter folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

import peftc

WORKER = Path(__file__).parent / "workers" / "fsdp_train.py"
RULES = peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj"))


def _launch(out: Path, *options: str) -> list[dict[str, torch.Tensor]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(peftc.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), str(out), *options], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [load_file(out / f"rank{r}.safetensors") for r in range(2)]


def _one_process(checkpointing: bool = False):
    """The same steps in one process: the mean of the two halves' losses, backpropagated at once."""
    cm = peftc.compile(make_llama(), RULES, backend="eager").train()
    if checkpointing:
        cm.gradient_checkpointing_enable()
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(1, 100, (8, 10), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        halves = [cm(input_ids=h, labels=h).loss for h in ids.chunk(2)]
        losses.append(torch.stack([h.detach() for h in halves]))
        (sum(halves) / 2).backward()
        opt.step()
        opt.zero_grad()
    return cm, torch.stack(losses, dim=1)  # [rank, step]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fsdp_two_ranks_equal_one_process(tmp_path, checkpointing):
    ranks = _launch(tmp_path, *(["checkpointing"] if checkpointing else []))
    cm, losses = _one_process(checkpointing)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["losses"], losses[r], atol=1e-5, rtol=0)
    trained = {n: p.detach() for n, p in cm.named_parameters() if p.requires_grad}
    for rank in ranks:
        assert rank.keys() - {"losses", "memory"} == trained.keys()
        for name, value in trained.items():
            torch.testing.assert_close(rank[name], value, atol=1e-5, rtol=0)

    # Memory: each rank holds half the base (its shards), and no whole copy anywhere in the model,
    # its graphs or its traces; while a layer runs, only that layer's weights are gathered.
    for rank in ranks:
        resident, whole, layer, gathered = rank["memory"].tolist()
        assert resident <= whole / 2 + layer, (resident, whole, layer)
        assert gathered <= layer, (gathered, layer)

    # save_pretrained gathered the adapters on rank 0: PEFT loads the folder and gets the trained weights.
    from peft import PeftModel

    peft = PeftModel.from_pretrained(make_llama(), str(tmp_path / "adapter"))
    ours = {n.removeprefix("peftc.adapters.default."): p for n, p in trained.items()}
    theirs = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p.detach()
              for n, p in peft.named_parameters() if "lora_" in n}
    assert theirs.keys() == ours.keys()
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, atol=1e-6, rtol=0)
