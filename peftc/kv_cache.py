"""The KV cache of a generate call, as tensors that enter and leave the adapted graph.

transformers' models read and write their cache through the ``Cache``
interface (``update``, ``get_seq_length``, ``get_mask_sizes``). For a graph,
the cache must be plain tensors: per layer, keys and values of a fixed
capacity (``[batch, kv_heads, capacity, head_dim]``, as transformers'
``StaticCache`` holds them) and the number of positions filled, a 0-dim tensor.

- Outside the graph, :class:`GenerationCache` is the ``Cache`` transformers'
  generation loop holds between steps (``reorder_cache`` for beam search, the
  filled length for slicing inputs).
- Each step passes its tensors to the graph as :class:`CacheInputs`; inside,
  the input boundary wraps them in :class:`SlotLayer` s, whose ``update``
  writes the step's keys and values in place with ``index_copy_``. Export
  records those writes as mutations of graph inputs, so the graph's outputs
  are written back into the same tensors, and every dim (batch, capacity)
  stays symbolic: one prefill and one decode graph serve every generate call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import PeftcError


class CacheInputs(NamedTuple):
    """A step's cache as graph inputs: ``(keys, values, filled)`` per layer, and whether this
    is the step that fills it first (prefill), which input rewrites treat differently."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    first: bool


class SlotLayer(CacheLayerMixin):
    """One layer's cache over given tensors: ``update`` writes keys and values at the next
    positions, in place, and returns the whole capacity (the attention mask hides the rest)."""

    is_compileable = False  # masks stay 2-D: the graph builds them, and input rewrites extend them
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.filled = keys, values, filled
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated by GenerationCache
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        positions = torch.arange(key_states.shape[-2], device=key_states.device) + self.filled
        self.keys.index_copy_(2, positions, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        self.filled.add_(key_states.shape[-2])
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self):
        return self.filled

    def get_max_length(self) -> int:
        return self.keys.shape[2]


def cache_of(inputs: CacheInputs) -> Cache:
    """The ``Cache`` a model reads inside the graph, over the step's tensors."""
    return Cache(layers=[SlotLayer(k, v, n) for k, v, n in inputs.layers])


class GenerationCache(Cache):
    """The cache one generate call holds: allocated on the first step, for ``capacity`` positions.

    Arguments:
        config: the model's config (layers, key/value heads, head size).
        capacity: positions to hold: virtual tokens that enter the cache, the prompt,
            and the new tokens.
    """

    is_compileable = False  # transformers' generate must not compile the step: peftc lowers its graphs itself

    def __init__(self, config, capacity: int):
        text = config.get_text_config(decoder=True)
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
        layers = getattr(text, "num_hidden_layers", None)
        if not (kv_heads and head_dim and layers):
            raise PeftcError(f"peftc can't size a KV cache for {type(config).__name__}: its config doesn't say "
                             "num_hidden_layers, num_attention_heads / num_key_value_heads and head_dim")
        self._shape = (kv_heads, capacity, head_dim)
        self.seen = 0  # positions filled so far, counted outside the graph (no device sync)
        super().__init__(layers=[SlotLayer(*_empty()) for _ in range(layers)])

    def allocate(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate every layer's keys and values (zeros) for ``batch`` rows."""
        shape = (batch, *self._shape)
        self.layers = [SlotLayer(torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros((), dtype=torch.long, device=device)) for _ in self.layers]

    @property
    def capacity(self) -> int:
        return self._shape[1]

    def inputs(self) -> CacheInputs:
        """This step's graph inputs."""
        return CacheInputs(tuple((layer.keys, layer.values, layer.filled) for layer in self.layers), self.seen == 0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


def _empty():
    return torch.empty(0), torch.empty(0), torch.zeros((), dtype=torch.long)
