"""AdaptionPrompt (LLaMA-Adapter): gated attention to learned prompt tokens in the top layers.

At each chosen ``aten.scaled_dot_product_attention`` the queries also attend, on
their own softmax, to ``n`` learned tokens ``P`` (``[1, n, hidden]``), projected by
the layer's own key and value projections (found in the graph:
:func:`~peftc.sites.attention_projections`). A zero-initialised gate ``g`` scales
the result, so a new adapter leaves the model unchanged::

    %kp = aten.linear(view(%P, [n, hidden]), %k_proj.weight)        # and %vp with v_proj
    %k  = repeat_interleave(permute(view(%kp, [n, kv_heads, d]), [1, 0, 2]), heads // kv_heads, 0)
    %s  = aten.div(aten.matmul(%q, aten.transpose(%k, -2, -1)), sqrt(d))
    %a  = aten.matmul(aten.mul(aten._softmax(%s, -1, False), %g), %v)
    %o  = aten.add(%o, %a)                     # the attention output, before o_proj

Adding before the output projection is PEFT's ``o_proj(attention) + o_proj(adapter)``
when ``o_proj`` has no bias; with one, PEFT adds the bias twice, and that is refused.
The prompt tokens get no rotary embedding and no mask: every query sees all of them.
PEFT's state keys are ``<attention module>.adaption_prompt`` and ``.adaption_gate``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RuleError
from ..match import attention
from ..sites import ATTENTION, attention_projections, linear_use
from .base import NO_ATTENTION_HINT, Adapter, check_virtual_tokens

aten = torch.ops.aten


class AdaptionPromptState(nn.Module):
    def __init__(self, adapter_len: int, hidden: int, device):
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden, device=device))
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=device))


class AdaptionPrompt(Adapter):
    """AdaptionPrompt (PEFT's ``AdaptionPromptConfig``, LLaMA-Adapter) on attention ops.

    Arguments:
        adapter_len: how many prompt tokens each adapted attention op attends to, > 0.
        adapter_layers: as a rule by itself, the adapter goes on the attention of the
            last ``adapter_layers`` layers (``peftc.attention(top=adapter_layers)``).
            With ``.on(selector)`` it may be None (the selector decides), or must be
            how many attention ops the selector picks.
    """

    kind = "adaption_prompt"
    gates_itself = True

    def __init__(self, adapter_len: int, adapter_layers: int | None = None):
        check_virtual_tokens(adapter_len)
        if adapter_layers is not None and (isinstance(adapter_layers, bool) or not isinstance(adapter_layers, int)
                                           or adapter_layers <= 0):
            raise RuleError(f"AdaptionPrompt adapter_layers={adapter_layers!r} must be a positive integer")
        self.adapter_len, self.adapter_layers = adapter_len, adapter_layers

    def default_selector(self):
        return attention(top=self.adapter_layers) if self.adapter_layers else None

    def no_site_hint(self):
        return NO_ATTENTION_HINT

    def unsupported(self, site):
        if site.kind != ATTENTION:
            return "AdaptionPrompt goes on attention ops (peftc.attention())"
        found = site.projections
        if "key" not in found or "value" not in found:
            return ("AdaptionPrompt needs keys and values that each come out of one linear projection "
                    "(Llama's k_proj and v_proj); peftc found none it could follow back from this attention op")
        if found["key"] == found["value"]:
            return (f"its keys and values come out of one fused projection ({found['key']}, as in GPT-2); "
                    "AdaptionPrompt supports separate key and value projections (Llama, Mistral)")
        if "output" not in found:
            return "AdaptionPrompt needs the attention output to go into one linear projection (o_proj)"
        if "output_bias" in found:
            return (f"its output projection {found['output']} adds a bias, which PEFT's AdaptionPrompt adds a "
                    "second time (its o_proj runs on the prompt's output too); peftc doesn't reproduce that: "
                    "use a model without attention biases (attention_bias=False)")
        return None

    def init_states(self, sites, model):
        if self.adapter_layers is not None and len(sites) != self.adapter_layers:
            raise RuleError(f"AdaptionPrompt(adapter_layers={self.adapter_layers}) was put on {len(sites)} "
                            "attention ops; give adapter_layers=None with a selector, or drop the selector")
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not hidden:
            raise RuleError("AdaptionPrompt sizes its prompt by model.config.hidden_size, which this model lacks")
        return [(s.key, AdaptionPromptState(self.adapter_len, hidden, s.device)) for s in sites]

    def emit(self, b, site):
        projections = attention_projections(b.node)
        q = b.node.args[0]
        batch_heads, head_dim = q.meta["val"].shape[1], site.head_dim
        n, hidden = b.state.adaption_prompt.shape[1:]
        prompt = b.call(aten.view.default, b.param("adaption_prompt"), [n, hidden])
        kv = []
        for role in ("key", "value"):
            p = _project(b, projections[role], b.cast(prompt, site.dtype))  # [n, kv_heads * d]
            p = b.call(aten.view.default, p, [n, -1, head_dim])
            p = b.call(aten.permute.default, p, [1, 0, 2])  # [kv_heads, n, d]
            p = b.call(aten.repeat_interleave.self_int, p, batch_heads // _width(projections[role], head_dim), 0)
            kv.append(b.cast(p, b.dtype_of(q)))
        scores = b.call(aten.matmul.default, q, b.call(aten.transpose.int, kv[0], -2, -1))
        scores = b.call(aten.div.Tensor, scores, math.sqrt(head_dim))
        probs = b.call(aten._softmax.default, b.cast(scores, torch.float32), -1, False)
        probs = b.call(aten.mul.Tensor, b.cast(probs, b.dtype_of(q)), b.cast(b.param("adaption_gate"), b.dtype_of(q)))
        out = b.call(aten.matmul.default, probs, kv[1])
        return b.call(aten.add.Tensor, b.y, b.gated(out, b.y, 4))

    def saved_state(self, site, state, prefix):
        return {prefix + "adaption_prompt": state.adaption_prompt, prefix + "adaption_gate": state.adaption_gate}

    def config(self):
        return {"kind": self.kind, "adapter_len": self.adapter_len, "adapter_layers": self.adapter_layers}

    def __repr__(self):
        return f"AdaptionPrompt(adapter_len={self.adapter_len}, adapter_layers={self.adapter_layers})"


def _project(b, linear, x):
    """The linear op ``linear`` (same weight, bias and form) applied to ``x`` instead of its input."""
    use = linear_use(linear)
    args = list(linear.args)
    args[use.input_index] = x
    return b.call(linear.target, *args, **linear.kwargs)


def _width(linear, head_dim: int) -> int:
    """How many heads the projection ``linear`` makes."""
    return linear.meta["val"].shape[-1] // head_dim
