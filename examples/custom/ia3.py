"""IA³ as a custom adapter kind: learned scaling vectors on keys, values and feed-forward activations.

    python examples/custom/ia3.py [--steps 20]

IA³ (Liu et al., 2022) multiplies activations by learned vectors, initialised
to ones: the outputs of ``k_proj`` and ``v_proj`` (``y * l``, after the op)
and the input of ``down_proj`` (``x * l``, before it). Both fold into the
weights: ``y * l`` is ``diag(l) W`` (and ``b * l``), ``x * l`` is ``W diag(l)``.
Merging is multiplicative, so ``unmerge_delta`` is overridden: given the
merged weights it returns what to subtract, ``W' (1 - 1/l)``.

The whole kind is the ``IA3`` class below, written against the public
protocol only (``peftc.Adapter`` and the builder ``b``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import peftc

aten = torch.ops.aten


class IA3(peftc.Adapter):
    """``y * l`` after a linear-like op; with ``feedforward=True``, ``x * l`` before it."""

    kind = "ia3_example"  # the built-in peftc.IA3 is kind "ia3"

    def __init__(self, feedforward: bool = False):
        self.feedforward = feedforward
        self.position = "before" if feedforward else "after"  # per spec, read by the insert pass

    def unsupported(self, site):
        return None if site.is_linear else f"IA3 scales linear-like ops, not {site.op}"

    def init_state(self, site):
        state = nn.Module()
        dtype = torch.float64 if site.dtype == torch.float64 else torch.float32
        size = site.in_features if self.feedforward else site.out_features
        state.ia3_l = nn.Parameter(torch.ones(size, dtype=dtype, device=site.device))
        return state

    def emit(self, b, site):
        scale = b.cast(b.param("ia3_l"), site.dtype)
        if self.feedforward:  # rewire the op's activation input to x * l
            b.replace_input(list(b.node.args).index(b.x), b.call(aten.mul.Tensor, b.x, scale))
            return b.y
        return b.call(aten.mul.Tensor, b.y, scale)

    def _deltas(self, site, state, weights, factor):
        w = weights[site.weight_name]
        s = state.ia3_l.detach().to(w.dtype)
        rows = (site.layout == "out_in") != self.feedforward  # does the scale run along the weight's rows?
        out = {site.weight_name: w * factor(s.view(-1, 1) if rows else s.view(1, -1))}
        if site.has_bias and site.bias_name and not self.feedforward:
            out[site.bias_name] = weights[site.bias_name] * factor(s)
        return out

    def merge_delta(self, site, state, weights):  # W' = W * l  ->  add W (l - 1)
        return self._deltas(site, state, weights, lambda s: s - 1)

    def unmerge_delta(self, site, state, weights):  # W = W' / l  ->  subtract W' (1 - 1/l)
        return self._deltas(site, state, weights, lambda s: 1 - 1 / s)

    def config(self):
        return {"kind": self.kind, "feedforward": self.feedforward}

    def __repr__(self):
        return f"IA3(feedforward={self.feedforward})"


RULES = [IA3().on(peftc.linear(r".*\.(k|v)_proj")), IA3(feedforward=True).on(peftc.linear(r".*\.down_proj"))]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def main(steps: int = 20) -> dict:
    from peftc.testing import assert_merge_equivalent

    model = tiny_llama()
    ids = (torch.arange(12).reshape(2, 6) * 5 + 1) % 64  # a fixed toy batch
    cm = peftc.compile(model, RULES, example_inputs={"input_ids": ids}, backend="eager")
    print(f"IA3 on {len(cm.sites)} sites:", ", ".join(sorted({p.path.split('.')[-1] for p in cm.sites})))
    cm.print_trainable_parameters()

    # The tiny Llama has no dropout, so training in eval mode reuses the one trace.
    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        logits = cm(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")

    with torch.no_grad():
        before = cm(input_ids=ids).logits
        cm.merge()
        merged = cm(input_ids=ids).logits
        cm.unmerge()
        restored = cm(input_ids=ids).logits
    gap = (merged - before).abs().max().item()
    print(f"trained IA3: max |merged - unmerged| logits = {gap:.2e}, "
          f"after unmerge {(restored - before).abs().max().item():.2e}")

    # peftc.testing's check on a fresh model, with random scales instead of trained ones
    assert_merge_equivalent(tiny_llama(), RULES, {"input_ids": ids})
    print("peftc.testing.assert_merge_equivalent: passed")
    return {"losses": losses, "merge_gap": gap, "sites": len(cm.sites)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
