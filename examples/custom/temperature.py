"""A learned temperature on attention logits, found by a ``softmax(q @ k^T)`` pattern.

    python examples/custom/temperature.py [--steps 30]

The model's attention is hand-written (no ``scaled_dot_product_attention``, so
no built-in attention site). The pattern names what it computes::

    def attention_probs(q, k):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)

The ``0.5`` stands for any scale (literals are wildcards by default). The
site's op is the softmax; ``Temperature`` has ``position = "before"``, so it
rewires the softmax input: ``softmax(logits / exp(t))``, with one learned
``t`` per head (0 at the start: the base model's attention).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import peftc
from peftc.pattern import pattern

aten = torch.ops.aten


def attention_probs(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)


class Temperature(peftc.Adapter):
    """``softmax(logits / exp(t))`` at a softmax site; ``t`` per head when the head count is static."""

    kind = "temperature"
    position = "before"

    def unsupported(self, site):
        return None if "softmax" in site.op else f"Temperature goes on softmax ops, not {site.op}"

    def init_state(self, site):
        q = getattr(site, "shapes", {}).get("q") or ()
        heads = q[1] if len(q) == 4 and q[1] else 1
        state = nn.Module()
        dtype = torch.float64 if site.dtype == torch.float64 else torch.float32
        state.log_temperature = nn.Parameter(torch.zeros(heads, 1, 1, dtype=dtype, device=site.device))
        return state

    def emit(self, b, site):
        t = b.cast(b.call(aten.exp.default, b.param("log_temperature")), site.dtype)
        b.replace_input(0, b.call(aten.div.Tensor, b.x, t))
        return b.y

    def config(self):
        return {"kind": self.kind}

    def __repr__(self):
        return "Temperature()"


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, 1 / math.sqrt(d // heads)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.out((probs @ v).transpose(1, 2).reshape(b, n, d))


class TinyEncoder(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, depth: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Attention(d, heads) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))

    def forward(self, x):
        for norm, attn in zip(self.norms, self.layers, strict=True):
            x = x + attn(norm(x))
        return x


def main(steps: int = 30) -> dict:
    model = TinyEncoder().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 16, generator=g)
    target = torch.randn(4, 6, 16, generator=g)
    with torch.no_grad():
        base = model(x)
    cm = peftc.compile(model, [Temperature().on(pattern(attention_probs))], example_inputs=(x,), backend="eager")
    for p in cm.sites:
        print(f"  {p}: {p.num_params} temperatures")
    with torch.no_grad():
        start_gap = (cm(x) - base).abs().max().item()
    print(f"at init the adapted model equals the base model: max |diff| = {start_gap:.1e}")

    opt = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        loss = (cm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    temps = [p.state.log_temperature.detach().exp().flatten().tolist() for p in cm.sites]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")
    for p, t in zip(cm.sites, temps, strict=True):
        print(f"  {p.path}: temperatures " + ", ".join(f"{v:.3f}" for v in t))
    return {"losses": losses, "start_gap": start_gap, "temperatures": temps, "cm": cm}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
