"""Prefix tuning: learned keys and values that lead every self-attention's own.

peftc gives the model what PEFT gives it: a KV cache that already holds ``n``
positions, the prefix, and an attention mask (the decoder's, on an
encoder-decoder) led by ``n`` ones. The input boundary builds both, and it is
traced with the model, so the graph gains, in front of the model::

    %t = aten.view(%peftc.<name>.prefix.embedding, [n, 2*layers, kv_heads, head_dim])
    %k = aten.expand(aten.permute(aten.select(%t, 1, 2*l), [1, 0, 2])[None], [B, -1, -1, -1])
    ...                                      # written into a transformers Cache, layer l
    %m = aten.cat([ones(B, n), %attention_mask], 1)

Everything else is the model's own: it numbers the real tokens after the
cached ones (learned, offset or mask-derived positions, rotary angles,
relative biases and ALiBi all follow), builds its masks for a cache of that
length (sliding windows included: the cache's layers are the model's layer
types, from its config), and reads the prefix in whatever attention it runs,
sdpa or eager. On an encoder-decoder model the cache is the decoder's, so the
prefix leads decoder self-attention only: the encoder and cross-attention
read none, as in PEFT (whose table it keeps, rows doubled for the two
transformer submodules and read in PEFT's order).

The attention sites (an sdpa op, or a softmax over ``q @ k^T``: see
:mod:`peftc.sites`) say which layers there are and the heads' shape; the table
has PEFT's layout, ``[n, layers * 2 * kv_heads * head_dim]``, and saves as
PEFT's ``prompt_embeddings``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

from ..errors import RuleError
from ..match import attention, where
from ..sites import ATTENTION
from .base import NO_ATTENTION_HINT, Adapter, check_positions, check_virtual_tokens, lead_with_ones
from .prompt import encoder_decoder

# Inputs whose first dim is the batch; the first present names the batch size (an encoder-decoder's
# later generation steps bring the decoder's ids and the encoder's output only).
_SEQUENCES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


class PrefixState(nn.Module):
    """The prefix table, and PEFT's optional reparameterisation MLP."""

    def __init__(self, shape: tuple[int, int, int, int], token_dim: int, projection: int | None,
                 submodules: int, device):
        super().__init__()
        n, layers2, kv_heads, head_dim = shape
        width = layers2 * kv_heads * head_dim
        #: ``(n, 2 * layers, kv_heads, head_dim)``: the table's view per key/value and layer.
        self.shape = shape
        #: PEFT's ``num_transformer_submodules``: 2 on an encoder-decoder model, else 1.
        self.submodules = submodules
        rows = token_dim if projection else width
        self.embedding = nn.Parameter(torch.empty(n, rows, device=device))
        nn.init.normal_(self.embedding)
        self.transform = (
            nn.Sequential(nn.Linear(token_dim, projection), nn.Tanh(), nn.Linear(projection, width)).to(device)
            if projection else None
        )

    def forward(self) -> torch.Tensor:
        """The ``[n, layers * 2 * kv_heads * head_dim]`` table (the MLP applied, if any)."""
        return self.transform(self.embedding) if self.transform is not None else self.embedding

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """:meth:`forward`, without gradients (what is saved)."""
        return self()

    def keys_values(self, batch: int, dtype: torch.dtype | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix's keys and values, ``[batch, kv_heads, n, head_dim]`` each.

        On an encoder-decoder model PEFT doubles the table's key/value rows (for
        the decoder's self- and cross-attention) and gives layer ``l`` rows
        ``4l`` and ``4l + 1`` of the doubled table; it keeps its order here."""
        n, layers2, kv_heads, head_dim = self.shape
        rows = self()
        rows = (rows if dtype is None else rows.to(dtype)).view(n, layers2, kv_heads, head_dim)
        rows = torch.cat([rows] * self.submodules, 1).permute(1, 2, 0, 3)  # [2 * layers * submodules, heads, n, dim]
        stride = 2 * self.submodules
        out = []
        for layer in range(layers2 // 2):
            k, v = (rows[stride * layer + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
            out.append((k, v))
        return out


class Prefix(Adapter):
    """Prefix tuning (PEFT's ``PrefixTuningConfig``) on self-attention.

    Arguments:
        num_virtual_tokens: prefix length, > 0.
        projection: hidden size of PEFT's reparameterisation MLP
            (``prefix_projection=True, encoder_hidden_size=projection``); None for none.
    """

    kind = "prefix"
    gated = False  # it lengthens keys and values: switched by selecting another trace

    def __init__(self, num_virtual_tokens: int, projection: int | None = None):
        check_virtual_tokens(num_virtual_tokens)
        if projection is not None and (isinstance(projection, bool) or not isinstance(projection, int)
                                       or projection <= 0):
            raise RuleError(f"Prefix projection={projection!r} must be a positive hidden size or None")
        self.num_virtual_tokens, self.projection = num_virtual_tokens, projection

    def default_selector(self):
        return attention() & where(lambda s: not (s.cross or s.encoder), "self_attention_reading_the_cache")

    def no_site_hint(self):
        return NO_ATTENTION_HINT

    def unsupported(self, site):
        if site.kind != ATTENTION:
            return "Prefix goes on attention ops (peftc.attention())"
        if site.cross:
            return ("it is cross-attention (its keys come from another sequence), and a prefix leads "
                    "self-attention only, as PEFT's does")
        if site.encoder:
            return ("it is in the encoder, and a prefix leads the decoder's self-attention only, "
                    "as PEFT's does on encoder-decoder models")
        if site.layer is None:
            return f"Prefix needs a layer index in the attention module's path, and {site.path} has none"
        return None

    def init_states(self, sites, model):
        check_positions(model, self.num_virtual_tokens, "Prefix")
        params = inspect.signature(model.forward).parameters
        if "past_key_values" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise RuleError(f"Prefix hands the model its prefix as a KV cache, and {type(model).__name__}.forward "
                            "takes no past_key_values")
        layers = sorted({s.layer for s in sites})
        if layers != list(range(len(layers))):
            raise RuleError(f"Prefix needs the attention of every layer 0..N-1, got layers {layers}")
        config = getattr(model, "config", None)
        heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        shapes = {(s.heads or heads, s.head_dim) for s in sites}
        if len(shapes) != 1 or None in next(iter(shapes)):
            found = "; ".join(f"{s.path}: {s.heads or '?'} heads x {s.head_dim}" for s in sites)
            raise RuleError(f"Prefix needs one head count and size in every attention layer, and found {found}")
        site_heads, head_dim = shapes.pop()
        kv_heads = getattr(config, "num_key_value_heads", None) or site_heads
        token_dim = getattr(config, "hidden_size", None) or kv_heads * head_dim
        shape = (self.num_virtual_tokens, 2 * len(layers), kv_heads, head_dim)
        state = PrefixState(shape, token_dim, self.projection, 2 if encoder_decoder(model) else 1, sites[0].device)
        return [("prefix", state) for _ in sites]

    def rewrite_inputs(self, model, state, kwargs):
        seq2seq = encoder_decoder(model)
        self._shift_positions(kwargs)
        ids = next(kwargs[k] for k in _SEQUENCES if kwargs.get(k) is not None)
        if not seq2seq and kwargs.get("attention_mask") is None:  # no mask is all ones; a traced model wants one
            kwargs["attention_mask"] = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        lead_with_ones(kwargs, "decoder_attention_mask" if seq2seq else "attention_mask", self.num_virtual_tokens)
        cache = kwargs.get("past_key_values")  # a generation's first step brings its own, empty
        if not isinstance(cache, Cache):
            cache = DynamicCache(config=getattr(model, "config", None))
            if seq2seq:  # the decoder's self-attention cache; cross-attention reads the encoder's output
                cache = EncoderDecoderCache(cache, DynamicCache())
        own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        at = {"cache_position": torch.arange(self.num_virtual_tokens, device=ids.device)}
        dtype = getattr(model, "dtype", None)  # the model's (PEFT's base_model_torch_dtype)
        for layer, (k, v) in enumerate(state.keys_values(ids.shape[0], dtype)):
            own.update(k, v, layer, at)
        kwargs["past_key_values"] = cache
        return kwargs

    def rewrite_decode_inputs(self, model, state, kwargs):
        # The cache holds the prefix: only the mask must still show it, and given positions move past it.
        self._shift_positions(kwargs)
        lead_with_ones(kwargs, "decoder_attention_mask" if encoder_decoder(model) else "attention_mask",
                       self.num_virtual_tokens)
        return kwargs

    def _shift_positions(self, kwargs: dict) -> None:
        """Given positions count the prefix (as PEFT offsets them); else the model numbers the
        real tokens after the cache's, by its own scheme."""
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.num_virtual_tokens

    def emit(self, b, site):
        """Nothing to insert (the boundary feeds the prefix); check that it reaches the op's keys
        in a graph traced with it. A model that ignores the cache, or an attention that doesn't
        read it (a custom kernel fed by other keys), would otherwise train a prefix that does nothing."""
        reads = b.state_reads()
        if reads and not _reaches(reads, b.node):
            raise RuleError(
                f"Prefix can't prefix the attention at {site.path}: found {site.op} "
                f"({site.heads or '?'} heads x {site.head_dim}) whose keys and values don't come from the "
                "KV cache the model was given (past_key_values), so the prefix would never reach it. "
                "Select only attention that reads the cache (peftc.attention(...)), or use a model whose "
                "attention takes past_key_values")
        return b.y

    def generation_tokens(self):
        return self.num_virtual_tokens, self.num_virtual_tokens  # the prefix fills the first cache positions

    def saved_state(self, site, state, prefix):
        return {"prompt_embeddings": state.table()}

    def config(self):
        return {"kind": self.kind, "num_virtual_tokens": self.num_virtual_tokens, "projection": self.projection}

    def __repr__(self):
        return f"Prefix(num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection})"


def _reaches(sources: list, target) -> bool:
    """Whether ``target`` is computed from any of ``sources`` (graph nodes)."""
    seen, todo = set(), list(target.all_input_nodes)
    wanted = set(sources)
    while todo:
        node = todo.pop()
        if node in wanted:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return False
