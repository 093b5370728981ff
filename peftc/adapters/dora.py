"""DoRA: weight-decomposed LoRA, PEFT's semantics (``LoraConfig(use_dora=True)``).

The adapted weight is ``m * (W + s BA) / ||W + s BA||``, the norm taken per output
row and *detached* (the paper's section 4.3: it follows the update but passes no
gradient). ``m`` (PEFT's ``lora_magnitude_vector``) starts as those row norms, so
a new adapter is a no-op. At a linear site, with ``g = m / norm`` and ``b`` the
op's bias (none: no subtraction)::

    y = aten.linear(x, W, b)        y  = aten.linear(x, W, b)
                             ==>    l  = aten.linear(aten.linear(x, lora_A), lora_B)
                                    n  = aten.linalg_vector_norm(W + scaling * (lora_B @ lora_A), 2, [1])
                                    g  = aten.div(lora_magnitude_vector, aten.detach(n))
                                    y2 = y + (g - 1) * (y - b) + g * l * scaling
                                    y3 = aten.where(gate, y2, y)     # per row (peftc adds it)

In training with dropout, PEFT computes the base term again on the dropped-out
input, ``(g - 1) * linear(dropout(x), W)``, and so does this kind. The adapter
computes in float32 (float64 stays) and casts its result to the op's dtype.

Merging writes ``g * (W + s BA)`` (the bias stays). The norm comes from the
weight before merging; the merged weight's rows have norm ``|m|``, so unmerging
can't recompute it: merging keeps it in the state's ``weight_norm`` buffer (not
saved) and unmerging divides by ``g`` again, which a zero in ``m`` forbids.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MergeError, RuleError
from ..sites import linear_use
from ..storage import is_packed
from .base import Adapter, widen
from .lora import LoRA

aten = torch.ops.aten


class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation of linear-like ops (PEFT's ``use_dora=True``).

    Arguments: those of :class:`~peftc.LoRA` (``r``, ``alpha``, ``dropout``, ``init``
    True/False/"gaussian", ``use_rslora``, ``rank_pattern``, ``alpha_pattern``).
    """

    kind = "dora"
    combine = Adapter.combine  # add_weighted_adapter can't combine magnitudes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.init not in (True, False, "gaussian"):
            raise RuleError(f"DoRA with init={self.init!r} is not implemented in peftc; use init=True, "
                            "'gaussian' or False (or plain LoRA for PiSSA/OLoRA)")

    def unsupported(self, site):
        if not site.is_linear:
            return (f"DoRA supports linear-like ops (linear, addmm, mm, matmul), not {site.op}: peftc doesn't "
                    "implement PEFT's DoRA on embeddings or convolutions; use LoRA there or exclude the module")
        return None

    def init_states(self, sites, model):
        """LoRA's states plus the magnitude: the row norms of ``W + s BA`` (PEFT's start)."""
        out = super().init_states(sites, model)
        for site, (_, state) in zip(sites, out, strict=True):
            weight = model.get_parameter(site.weight_path)
            if is_packed(weight):
                raise RuleError(f"DoRA on the 4-bit weight of {site.path} is not implemented in peftc; "
                                "use LoRA for QLoRA, or DoRA on an unquantized model")
            w = weight.detach().to(state.lora_A.device, state.lora_A.dtype)
            norm = _norm(_out_in(site, w), state)
            state.lora_magnitude_vector = nn.Parameter(norm)
            state.register_buffer("weight_norm", torch.ones_like(norm), persistent=False)
        return out

    def emit(self, b, site):
        use = linear_use(b.node)
        dtype = b.state.lora_A.dtype
        x = b.cast(b.x, dtype)
        if b.training:  # an inactive adapter's rows pass no gradient, even 0 @ NaN
            x = b.call(aten.where.ScalarOther, b.row_mask(b.x), x, 0)
        dropout = b.training and self.dropout > 0
        if dropout:
            x = b.call(aten.dropout.default, x, self.dropout, True)
        lora = b.call(aten.linear.default, b.call(aten.linear.default, x, b.param("lora_A")), b.param("lora_B"))
        scaling = b.param("scaling")
        weight = b.cast(use.weight if site.layout == "out_in" else b.call(aten.t.default, use.weight), dtype)
        delta = b.call(aten.mul.Tensor, b.call(aten.mm.default, b.param("lora_B"), b.param("lora_A")), scaling)
        norm = b.call(aten.linalg_vector_norm.default, b.call(aten.add.Tensor, weight, delta), 2, [1])
        g = b.call(aten.div.Tensor, b.param("lora_magnitude_vector"), b.call(aten.detach.default, norm))
        y = b.cast(b.y, dtype)
        if dropout:  # PEFT: the base term again, on the dropped-out input
            base = b.call(aten.linear.default, x, weight)
        elif use.bias_index is not None:
            base = b.call(aten.sub.Tensor, y, b.cast(b.node.args[use.bias_index], dtype))
        else:
            base = y
        out = b.call(aten.mul.Tensor, b.call(aten.sub.Tensor, g, 1), base)
        out = b.call(aten.add.Tensor, out, b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, g, lora), scaling))
        return b.cast(b.call(aten.add.Tensor, y, out), site.dtype)

    def merge_delta(self, site, state, weights):
        """``g * (W + s BA) - W``, with ``g`` from the unmerged weight (kept for unmerging)."""
        w = _out_in(site, weights[site.weight_name])
        lora = widen(state.scaling) * (widen(state.lora_B) @ widen(state.lora_A))
        norm = torch.linalg.vector_norm(w + lora, 2, dim=1)
        with torch.no_grad():
            state.weight_norm.copy_(norm)
        g = (widen(state.lora_magnitude_vector.detach()) / norm).view(-1, 1)
        return {site.weight_name: _out_in(site, g * (w + lora) - w)}

    def unmerge_delta(self, site, state, weights):
        """``W' - (W' / g - s BA)``, with the norm kept at merging."""
        zeros = int((state.lora_magnitude_vector == 0).sum())
        if zeros:
            raise MergeError(f"DoRA at {site.path} has {zeros} zero magnitude(s): merging erased those rows, "
                             "so it can't be unmerged. Reload the base weights instead; nothing was changed")
        merged = _out_in(site, weights[site.weight_name])
        lora = widen(state.scaling) * (widen(state.lora_B) @ widen(state.lora_A))
        g = (widen(state.lora_magnitude_vector.detach()) / widen(state.weight_norm)).view(-1, 1)
        return {site.weight_name: _out_in(site, merged - (merged / g - lora))}

    def saved_state(self, site, state, prefix):
        return {**super().saved_state(site, state, prefix),
                f"{prefix}lora_magnitude_vector": state.lora_magnitude_vector}

    def __repr__(self):
        return f"DoRA(r={self.r}, alpha={self.alpha}, dropout={self.dropout})"


def _out_in(site, w: torch.Tensor) -> torch.Tensor:
    """A weight in ``[out, in]`` layout (and back: the transpose is its own inverse)."""
    return w if site.layout == "out_in" else w.T


@torch.no_grad()
def _norm(w: torch.Tensor, state) -> torch.Tensor:
    """The row norms of ``w + scaling * B A``."""
    return torch.linalg.vector_norm(w + state.scaling * (state.lora_B @ state.lora_A), 2, dim=1)
