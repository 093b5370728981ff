"""Prefix tuning: learned keys and values in front of every attention op's own.

At each ``aten.scaled_dot_product_attention`` (layer ``l``) the graph gains::

    %e  = aten.view(%peftc.<name>.prefix.embedding, [n, 2*layers, kv_heads, head_dim])
    %pk = aten.expand(aten.unsqueeze(aten.permute(aten.select(%e, 1, 2*l), [1, 0, 2]), 0), [B, -1, -1, -1])
    %k2 = aten.cat([%pk, %k], 2)                       # and %v2 likewise from 2*l + 1
    %m2 = aten.constant_pad_nd(%mask, [n, 0], True)    # prefix columns always visible
    %o  = aten.scaled_dot_product_attention(%q, %k2, %v2, %m2)

With grouped-query attention whose keys arrive repeated to all heads, the
prefix is repeated the same way (``repeat_interleave``). The table has PEFT's
layout, ``[n, layers * 2 * kv_heads * head_dim]``, so it saves as PEFT's
``prompt_embeddings``. As in PEFT, which feeds the prefix as a KV cache, the
real tokens' positions start at ``n``: the input boundary passes
``position_ids = n + arange(L)`` (or the caller's ``position_ids + n``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RuleError
from ..match import attention
from ..sites import ATTENTION
from .base import NO_ATTENTION_HINT, Adapter, check_positions, check_virtual_tokens

aten = torch.ops.aten


class PrefixState(nn.Module):
    """The prefix table, and PEFT's optional reparameterisation MLP."""

    def __init__(self, shape: tuple[int, int, int, int], token_dim: int, projection: int | None, device):
        super().__init__()
        n, layers2, kv_heads, head_dim = shape
        width = layers2 * kv_heads * head_dim
        #: ``(n, 2 * layers, kv_heads, head_dim)``: the table's view per key/value and layer.
        self.shape = shape
        rows = token_dim if projection else width
        self.embedding = nn.Parameter(torch.empty(n, rows, device=device))
        nn.init.normal_(self.embedding)
        self.transform = (
            nn.Sequential(nn.Linear(token_dim, projection), nn.Tanh(), nn.Linear(projection, width)).to(device)
            if projection else None
        )

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """The ``[n, layers * 2 * kv_heads * head_dim]`` table (the MLP applied, if any)."""
        return self.transform(self.embedding) if self.transform is not None else self.embedding


class Prefix(Adapter):
    """Prefix tuning (PEFT's ``PrefixTuningConfig``) on attention ops.

    Arguments:
        num_virtual_tokens: prefix length, > 0.
        projection: hidden size of PEFT's reparameterisation MLP
            (``prefix_projection=True, encoder_hidden_size=projection``); None for none.
    """

    kind = "prefix"
    position = "before"
    gated = False  # it lengthens keys and values: switched by selecting another trace

    def __init__(self, num_virtual_tokens: int, projection: int | None = None):
        check_virtual_tokens(num_virtual_tokens)
        if projection is not None and (isinstance(projection, bool) or not isinstance(projection, int)
                                       or projection <= 0):
            raise RuleError(f"Prefix projection={projection!r} must be a positive hidden size or None")
        self.num_virtual_tokens, self.projection = num_virtual_tokens, projection

    def default_selector(self):
        return attention()

    def no_site_hint(self):
        return NO_ATTENTION_HINT

    def unsupported(self, site):
        if site.kind != ATTENTION:
            return "Prefix goes on attention ops (peftc.attention())"
        if site.layer is None:
            return f"Prefix needs a layer index in the attention module's path, and {site.path} has none"
        return None

    def init_states(self, sites, model):
        check_positions(model, self.num_virtual_tokens, "Prefix")
        layers = sorted({s.layer for s in sites})
        if layers != list(range(len(layers))):
            raise RuleError(f"Prefix needs the attention of every layer 0..N-1, got layers {layers}")
        config = getattr(model, "config", None)
        heads = {s.heads for s in sites}
        head_dims = {s.head_dim for s in sites}
        if len(heads) != 1 or len(head_dims) != 1:
            raise RuleError("Prefix needs the same head count and size in every attention layer")
        head_dim = head_dims.pop()
        kv_heads = getattr(config, "num_key_value_heads", None) or heads.pop()
        token_dim = getattr(config, "hidden_size", None) or kv_heads * head_dim
        shape = (self.num_virtual_tokens, 2 * len(layers), kv_heads, head_dim)
        state = PrefixState(shape, token_dim, self.projection, sites[0].device)
        return [("prefix", state) for _ in sites]

    def rewrite_inputs(self, model, state, kwargs):
        n = self.num_virtual_tokens
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if "position_ids" in kwargs:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        elif ids is not None:
            positions = torch.arange(n, n + ids.shape[1], device=ids.device)
            kwargs["position_ids"] = positions.unsqueeze(0).expand(ids.shape[0], -1)
        return kwargs

    def generation_tokens(self):
        return 0, self.num_virtual_tokens  # the prefix joins the keys at each attention op, not the cache

    def emit(self, b, site):
        n, rows, kv_heads, head_dim = b.state.shape
        node = b.node
        q, k, v = node.args[:3]
        table = b.param("embedding")
        if b.state.transform is not None:
            table = b.call(aten.linear.default, table, b.param("transform.0.weight"), b.param("transform.0.bias"))
            table = b.call(aten.tanh.default, table)
            table = b.call(aten.linear.default, table, b.param("transform.2.weight"), b.param("transform.2.bias"))
        table = b.call(aten.view.default, table, [n, rows, kv_heads, head_dim])
        batch = b.call(aten.sym_size.int, k, 0)
        new = []
        for which, orig in ((0, k), (1, v)):
            p = b.call(aten.select.int, table, 1, 2 * site.layer + which)
            p = b.call(aten.permute.default, p, [1, 0, 2])
            if site.heads != kv_heads:
                p = b.call(aten.repeat_interleave.self_int, p, site.heads // kv_heads, 0)
            p = b.call(aten.unsqueeze.default, p, 0)
            p = b.call(aten.expand.default, p, [batch, -1, -1, -1])
            p = b.cast(p, site.dtype)
            new.append(b.call(aten.cat.default, [p, orig], 2))
        b.replace_input(1, new[0])
        b.replace_input(2, new[1])
        mask = b.arg(3, "attn_mask")
        if mask is not None:
            visible = True if b.dtype_of(mask) == torch.bool else 0.0
            b.replace_input(3, b.call(aten.constant_pad_nd.default, mask, [n, 0], visible), "attn_mask")
        elif b.arg(5, "is_causal"):
            length = b.call(aten.sym_size.int, q, 2)
            causal = b.call(aten.ones.default, [length, length], dtype=torch.bool,
                            device=q.meta["val"].device)
            causal = b.call(aten.tril.default, causal)
            b.replace_input(3, b.call(aten.constant_pad_nd.default, causal, [n, 0], True), "attn_mask")
            b.replace_input(5, False, "is_causal")
        return b.y

    def saved_state(self, site, state, prefix):
        return {"prompt_embeddings": state.table()}

    def config(self):
        return {"kind": self.kind, "num_virtual_tokens": self.num_virtual_tokens, "projection": self.projection}

    def __repr__(self):
        return f"Prefix(num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection})"
