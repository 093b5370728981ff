"""A bottleneck (Houlsby) adapter after every MLP block, found by a multi-node pattern.

    python examples/custom/houlsby.py [--steps 30]

Houlsby et al. (2019) add ``y + up(gelu(down(y)))`` after each feed-forward
block, ``up`` initialised to zero so training starts from the base model. The
MLP blocks are found by what they compute, ``linear -> gelu -> linear``, not
by module names::

    def mlp_block(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

Every argument is a wildcard (``b1`` and ``b2`` match a missing bias too), and
the site's op is the pattern's output, the second linear, so an ``"after"``
adapter sees the block's output as ``b.y``. The adapter is non-linear, so it
defines no ``merge_delta``: peftc refuses to merge it, with a clear error.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.nn import functional as F

import peftc
from peftc.pattern import pattern

aten = torch.ops.aten


def mlp_block(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


class HoulsbyState(nn.Module):
    def __init__(self, d: int, bottleneck: int, dtype, device):
        super().__init__()
        self.down = nn.Parameter(torch.empty(bottleneck, d, dtype=dtype, device=device))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(d, bottleneck, dtype=dtype, device=device))
        self.up_bias = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))


class Houlsby(peftc.Adapter):
    """``y + up(gelu(down(y)))`` after the site's op; a no-op at the start (``up`` is zero)."""

    kind = "houlsby"

    def __init__(self, bottleneck: int = 8):
        self.bottleneck = bottleneck

    def unsupported(self, site):
        return None if site.out_features else f"Houlsby needs a static feature size at {site}"

    def init_state(self, site):
        dtype = torch.float64 if site.dtype == torch.float64 else torch.float32
        return HoulsbyState(site.out_features, self.bottleneck, dtype, site.device)

    def emit(self, b, site):
        y = b.cast(b.y, b.state.down.dtype)
        h = b.call(aten.linear.default, y, b.param("down"), b.param("down_bias"))
        h = b.call(aten.gelu.default, h)
        h = b.call(aten.linear.default, h, b.param("up"), b.param("up_bias"))
        return b.cast(b.call(aten.add.Tensor, y, h), site.dtype)

    def config(self):
        return {"kind": self.kind, "bottleneck": self.bottleneck}

    def __repr__(self):
        return f"Houlsby(bottleneck={self.bottleneck})"


class Block(nn.Module):
    """A pre-norm transformer block; its MLP is written with F.linear on raw parameters."""

    def __init__(self, d: int, ff: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.w1, self.b1 = nn.Parameter(torch.randn(ff, d) / math.sqrt(d)), nn.Parameter(torch.zeros(ff))
        self.w2, self.b2 = nn.Parameter(torch.randn(d, ff) / math.sqrt(ff)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + F.linear(F.gelu(F.linear(self.norm2(x), self.w1, self.b1)), self.w2, self.b2)


class TinyGPT(nn.Module):
    def __init__(self, d: int = 16, ff: int = 32, depth: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(d, ff) for _ in range(depth))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main(steps: int = 30) -> dict:
    model = TinyGPT().eval()
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(4, 6, 16, generator=g), torch.randn(4, 6, 16, generator=g)
    with torch.no_grad():
        base = model(x)
    cm = peftc.compile(model, [Houlsby(bottleneck=4).on(pattern(mlp_block))], example_inputs=(x,), backend="eager")
    for p in cm.sites:
        print(f"  {p}")
    with torch.no_grad():
        start_gap = (cm(x) - base).abs().max().item()
    print(f"at init the adapted model equals the base model: max |diff| = {start_gap:.1e}")

    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (cm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")
    try:
        cm.merge()
    except peftc.MergeError as e:
        print(f"merge refused, as it should be: {str(e)[:90]}...")
    return {"losses": losses, "start_gap": start_gap, "sites": [p.path for p in cm.sites], "cm": cm}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
