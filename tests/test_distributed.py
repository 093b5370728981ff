"""DDP under torchrun: two CPU processes (gloo) train a compiled model; the ranks agree, and equal
one process on the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import make_llama
from safetensors.torch import load_file

import peftc

WORKER = Path(__file__).parent / "workers" / "ddp_train.py"


def test_ddp_two_ranks_agree_with_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(peftc.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 1
    for name in ranks[0]:
        if name != "losses":
            torch.testing.assert_close(ranks[0][name], ranks[1][name], atol=0, rtol=0)

    # One process, the global batch: DDP averages the ranks' gradients, which is the mean
    # loss over both halves (equal sizes) backpropagated at once.
    cm = peftc.compile(make_llama(), peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj")),
                       backend="eager").train()
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(1, 100, (8, 10), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        halves = [cm(input_ids=h, labels=h).loss for h in ids.chunk(2)]
        torch.testing.assert_close(torch.stack([halves[0].detach(), halves[1].detach()]),
                                   torch.stack([ranks[0]["losses"][step], ranks[1]["losses"][step]]),
                                   atol=1e-5, rtol=0)
        (sum(halves) / 2).backward()
        opt.step()
        opt.zero_grad()
    for name, p in cm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), ranks[0][name], atol=1e-5, rtol=0)
