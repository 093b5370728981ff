"""LoRA on a hand-written model whose layers are ``torch.einsum`` and ``x @ W`` on bare parameters.

    python examples/custom/einsum_lora.py [--steps 30]

Module-swapping libraries find ``nn.Linear`` modules; this model has none.
Each layer holds two raw ``nn.Parameter``\\ s and computes::

    h = torch.einsum("bld,df->blf", x, self.w_in)    # aten.einsum: a list operand
    y = torch.relu(h) @ self.w_out                   # aten.matmul with a parameter

- ``x @ W`` is a linear-like site peftc already knows (layout ``"in_out"``):
  the built-in ``peftc.LoRA`` goes on it with ``peftc.linear(...)``.
- ``aten.einsum`` takes its operands as one list, so it is no built-in site.
  A one-line pattern finds it: ``peftc.pattern(einsum_proj)`` matches every
  ``einsum("bld,df->blf", x, w)`` (``ignore_literals=False`` pins the
  equation), and ``EinsumLoRA`` -- ``peftc.LoRA`` with its ``emit`` reading
  ``x`` through the pattern and its merge writing into the matched ``w`` --
  adapts it. Both merge into the model's own parameters.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import peftc
from peftc.pattern import pattern

aten = torch.ops.aten


class EinsumLayer(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d, ff) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(ff, d) / math.sqrt(ff))

    def forward(self, x):
        h = torch.einsum("bld,df->blf", x, self.w_in)
        return x + torch.relu(h) @ self.w_out


class EinsumModel(nn.Module):
    def __init__(self, d: int = 8, ff: int = 16, depth: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(EinsumLayer(d, ff) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def einsum_proj(x, w):
    return torch.einsum("bld,df->blf", x, w)


class EinsumLoRA(peftc.LoRA):
    """LoRA on a pattern site ``einsum("...d,df->...f", x, w)``: ``y + s * B (A x)``, merged into ``w``."""

    kind = "einsum_lora"

    def unsupported(self, site):
        if "w" not in getattr(site, "params", {}):
            return "EinsumLoRA goes on peftc.pattern sites whose argument w matched a parameter"
        return None

    def emit(self, b, site):
        x = b.cast(site.input(b, "x"), b.state.lora_A.dtype)
        a = b.call(aten.linear.default, x, b.param("lora_A"))
        d = b.call(aten.linear.default, a, b.param("lora_B"))
        d = b.call(aten.mul.Tensor, d, b.param("scaling"))
        return b.cast(b.call(aten.add.Tensor, b.y, d), site.dtype)

    def merge_delta(self, site, state, weights):
        wide = torch.float64 if state.lora_A.dtype == torch.float64 else torch.float32
        delta = state.scaling.to(wide) * (state.lora_B.to(wide) @ state.lora_A.to(wide))  # [f, d]
        return {site.params["w"]: delta.T}  # w is stored [d, f]

    def config(self):
        return {**super().config(), "kind": self.kind}

    def __repr__(self):
        return "Einsum" + super().__repr__()


def rules(r: int = 4):
    return [
        EinsumLoRA(r=r, alpha=2 * r).on(pattern(einsum_proj, ignore_literals=False)),
        # every `x @ W` with a parameter W is a linear site: here each layer's w_out
        peftc.LoRA(r=r, alpha=2 * r).on(peftc.linear()),
    ]


def main(steps: int = 30) -> dict:
    from peftc.testing import assert_merge_equivalent

    model = EinsumModel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=g)
    target = torch.randn(4, 5, 8, generator=g)
    cm = peftc.compile(model, rules(), example_inputs=(x,), backend="eager")
    for p in cm.sites:
        print(f"  {p}")
    cm.print_trainable_parameters()

    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (cm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")

    with torch.no_grad():
        before = cm(x)
        cm.merge()
        gap = (cm(x) - before).abs().max().item()
        plain = (model(x) - before).abs().max().item()  # the model's own einsum/matmul, merged weights
        cm.unmerge()
    print(f"max |merged - unmerged| = {gap:.2e} (compiled), {plain:.2e} (the model's own forward)")

    assert_merge_equivalent(EinsumModel(), rules(), (x,))
    print("peftc.testing.assert_merge_equivalent: passed")
    return {"losses": losses, "merge_gap": max(gap, plain), "sites": [p.site.op for p in cm.sites]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
