"""Which optimisation passes run when a graph is lowered, and how: :class:`Optimize`.

The passes run on the adapted graph just before it is handed to
``torch.compile`` (after the adapter passes, before checkpointing), each
returning a new graph module over the same state, so the adapted graph stays
what adapters are inserted into and stripped from. Each can be switched off.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .errors import PeftcError
from .passes.fuse_lora_a import fuse_lora_a
from .passes.fused_loss import fused_loss


@dataclass(frozen=True)
class Optimize:
    """Switches for peftc's optimisation passes (``peftc.compile(..., optimize=peftc.Optimize(...))``).

    Attributes:
        fused_loss: in training graphs, compute a causal LM's loss from ``labels`` with a
            chunked linear + cross-entropy (:mod:`peftc.passes.fused_loss`): the
            ``[batch, seq, vocab]`` logits are never held, and the output's ``logits``
            is None. Turn it off to read ``.logits`` of a training-mode call given labels.
        loss_chunk: tokens per chunk of logits for ``fused_loss``; None: as many as make
            2**23 logits (32 MiB in float32: 256 tokens at a 32000-word vocabulary).
        fuse_lora_a: one matmul for the LoRA-A projections of sites that share an input
            (:mod:`peftc.passes.fuse_lora_a`).
        dynamic: ``torch.compile``'s ``dynamic``: True compiles for any batch and sequence
            length from the first call; None specialises on the first shapes and compiles
            again, dynamically, when a second shape arrives.
    """

    fused_loss: bool = True
    loss_chunk: int | None = None
    fuse_lora_a: bool = False
    dynamic: bool | None = True

    def __post_init__(self):
        if self.loss_chunk is not None and (isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int)
                                            or self.loss_chunk < 1):
            raise PeftcError(f"Optimize(loss_chunk={self.loss_chunk!r}): give a positive number of tokens, e.g. 1024")

    def apply(self, gm: fx.GraphModule, training: bool) -> fx.GraphModule:
        """``gm`` with the switched-on passes applied (training-only passes only when ``training``)."""
        if self.fuse_lora_a:
            gm = fuse_lora_a(gm)
        if self.fused_loss and training:
            gm = fused_loss(gm, self.loss_chunk)
        return gm
