"""The KV cache of a generate call, as tensors that enter and leave the adapted graph.

transformers' models read and write their cache through the ``Cache``
interface (``update``, ``get_seq_length``, ``get_mask_sizes``). For a graph,
the cache must be plain tensors: per layer, keys and values of a fixed
capacity (``[batch, kv_heads, capacity, head_dim]``, as transformers'
``StaticCache`` holds them) and the number of positions filled, a 0-dim tensor.

- Outside the graph, :class:`GenerationCache` is the ``Cache`` transformers'
  generation loop holds between steps (``reorder_cache`` for beam search, the
  filled length for slicing inputs).
- The first step (the prompt) runs the model on a fresh ``DynamicCache`` and
  returns its keys and values; :meth:`GenerationCache.fill` copies them into
  tensors of the full capacity, so the model itself says how many layers,
  heads and head dims there are.
- Each later step passes the tensors to the graph as :class:`CacheInputs`;
  inside, the input boundary wraps them in :class:`SlotLayer` s, whose
  ``update`` writes the step's keys and values in place with ``index_copy_``.
  Export records those writes as mutations of graph inputs, so the graph
  writes back into the same tensors, and every dim (batch, capacity) stays
  symbolic: one first-step and one later-step graph serve every generate call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, EncoderDecoderCache

from .errors import PeftcError


class CacheInputs(NamedTuple):
    """A step's cache as graph inputs: ``(keys, values, filled)`` per layer; empty on the
    first step (the prompt), which returns its keys and values instead."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] = ()

    @property
    def first(self) -> bool:
        return not self.layers


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


def step_cache(inputs: CacheInputs, encoder_decoder: bool) -> Cache:
    """The ``Cache`` the model reads inside the graph: a fresh ``DynamicCache`` on the first
    step, slots over the step's tensors after. An encoder-decoder model's cross-attention
    keys and values are computed from the encoder's output at every step (not cached)."""
    cache = DynamicCache() if inputs.first else Cache(layers=[SlotLayer(k, v, n) for k, v, n in inputs.layers])
    return EncoderDecoderCache(cache, DynamicCache()) if encoder_decoder else cache


def step_outputs(cache: Cache) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """What a step returns of its cache: the first step's keys and values (later steps
    write theirs in place and return nothing)."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, DynamicCache):
        return ()
    return tuple((layer.keys, layer.values) for layer in cache.layers)


class GenerationCache(Cache):
    """The cache one generate call holds between steps, ``capacity`` positions per layer.

    The first step's keys and values (their shapes come from the model itself)
    are copied into tensors of the full capacity; later steps write into those.
    """

    is_compileable = False  # transformers' generate must not compile the step: peftc lowers its graphs itself

    def __init__(self, capacity: int):
        super().__init__(layers=[])
        self.capacity = capacity
        self.seen = 0  # positions filled so far, counted outside the graph (no device sync)

    def fill(self, prefilled: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> None:
        """Allocate every layer for ``capacity`` positions, holding the first step's keys and values."""
        layers = []
        for keys, values in prefilled:
            length = keys.shape[2]
            if length > self.capacity:
                raise PeftcError(f"the prompt filled {length} cache positions, more than the {self.capacity} "
                                 "this generate call sized for")
            slots = []
            for t in (keys, values):
                full = t.new_zeros((*t.shape[:2], self.capacity, t.shape[3]))
                full[:, :, :length] = t
                slots.append(full)
            layers.append(SlotLayer(*slots, torch.tensor(length, device=keys.device)))
        self.layers = layers
        self.seen = prefilled[0][0].shape[2] if prefilled else 0

    def inputs(self) -> CacheInputs:
        """This step's graph inputs."""
        return CacheInputs(tuple((layer.keys, layer.values, layer.filled) for layer in self.layers))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen
