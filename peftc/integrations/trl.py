"""``peftc.SFTTrainer``: TRL's ``SFTTrainer`` training a compiled model, its adapters always in the loss.

TRL's ``SFTTrainer`` computes its loss through a "fused LM head": it replaces
the model's ``forward`` with one that, called with ``fused_lm_head=True``
(every training and evaluation step), runs ``model.base_model`` for the hidden
states and projects them through ``model.get_output_embeddings()`` in tiles.
On a PEFT model those are the backbone and head with LoRA layers swapped in.
On a :class:`~peftc.CompiledModel`, ``base_model`` is the user's model
*without* the adapters, which live in the graph: TRL's head would bypass them
(plain ``trl.SFTTrainer(model=cm)`` fails at its first step, as
``base_model`` returns logits where TRL expects hidden states).

This subclass gives the fused calls a forward that runs the adapted graph and
scores its logits into TRL's ``FusedCausalLMOutput``: the same per-token
fields (log-probabilities, entropy, top-1, ...) and loss, computed from the
full logits rather than in tiles. Everything else is TRL's, and checkpoints
are PEFT adapter folders, as with :class:`peftc.Trainer`.
"""

from __future__ import annotations

import functools
import types

import torch
import trl
from trl.trainer.utils import FusedCausalLMOutput

from ..compiled import CompiledModel
from ..errors import PeftcError
from .trainer import AdapterCheckpoints


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """``trl.SFTTrainer`` for a :class:`~peftc.CompiledModel` (``model=peftc.get_peft_model(model, config)``)."""

    def __init__(self, model: CompiledModel, *args, **kwargs):
        if not isinstance(model, CompiledModel):
            raise PeftcError(f"peftc.SFTTrainer trains a peftc CompiledModel, got {type(model).__name__}: pass "
                             "model=peftc.get_peft_model(model, peft_config) (or use trl.SFTTrainer for others)")
        if kwargs.get("peft_config") is not None:
            raise PeftcError("peftc.SFTTrainer takes the adapters from the compiled model; drop peft_config "
                             "(build the model with peftc.get_peft_model(model, peft_config))")
        super().__init__(model, *args, **kwargs)
        model.forward = types.MethodType(_scoring_forward(type(model).forward), model)  # TRL's replaced


def _scoring_forward(forward):
    """``forward``, also answering TRL's ``fused_lm_head=True`` calls from the adapted logits."""

    @functools.wraps(forward)  # keeps the model's signature for Trainer and generate
    def scoring_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                        **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return forward(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        out = forward(self, *args, **kwargs)
        logits = out.logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels.to(logits.device) != -100
        scores = token_scores(logits, labels.to(logits.device), mask)
        loss = -scores["log_probs"].sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None
                                              else num_items_in_batch)
        aux_loss = getattr(out, "aux_loss", None) if kwargs.get("output_router_logits") else None
        if aux_loss is not None:
            loss = loss + getattr(self.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **scores)

    return scoring_forward


def token_scores(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's per-token fields of ``FusedCausalLMOutput`` from full logits, in float32, zero where ``mask`` is off.

    ``log_probs`` (of each label) and ``entropy`` carry gradients; ``log_sum_sq_probs``
    (log of the summed squared probabilities), ``mean_logits`` and ``is_top1`` (the
    label is the first maximum) do not, as in TRL's kernel.
    """
    z = logits.float()
    log_z = torch.logsumexp(z, dim=-1)
    target = labels.clamp(min=0).unsqueeze(-1)
    probs = torch.softmax(z, dim=-1)
    with torch.no_grad():
        detached = {"log_sum_sq_probs": probs.square().sum(-1).log(), "mean_logits": z.mean(-1),
                    "is_top1": z.argmax(-1) == target.squeeze(-1)}
    scores = {"log_probs": z.gather(-1, target).squeeze(-1) - log_z, "entropy": log_z - (probs * z).sum(-1),
              **detached}
    return {name: value.masked_fill(~mask, 0) for name, value in scores.items()}
