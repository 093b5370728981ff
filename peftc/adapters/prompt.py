"""Prompt tuning: learned virtual-token embeddings in front of the input embeddings.

This is a rewrite of the input boundary, not of one op: a wrapper around the
model looks up the input embeddings itself, prepends the prompt, extends the
attention mask (virtual tokens visible), pads token-level labels with -100 and
``token_type_ids`` with 0, and calls the model with ``inputs_embeds``. The
wrapper is traced with the model, so the graph gains, in front of the model::

    %e  = aten.embedding(%embed_tokens.weight, %input_ids)
    %p  = aten.expand(aten.unsqueeze(%peftc.<name>.prompt.embedding, 0), [B, -1, -1])
    %x  = aten.cat([%p, %e], 1)                    # the model runs on %x
    %m  = aten.cat([ones(B, n), %attention_mask], 1)

Rewriting the boundary (rather than splicing a ``cat`` after the embedding op)
is what makes every length-dependent computation downstream (positions, causal
masks, the label shift) see ``n + L`` tokens, exactly as PEFT's model does.
Outputs follow PEFT: causal-LM logits include the virtual positions.

On an encoder-decoder model the prompt leads the encoder's input only (the
labels, which are the decoder's, are left alone), and the table holds ``2n``
tokens, as PEFT's does for its two transformer submodules, of which the
encoder reads the first ``n``: so counts and checkpoints are PEFT's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RuleError
from ..match import input_embeddings
from .base import Adapter, check_positions, check_virtual_tokens, lead_with_ones

_INITS = ("random", "text", "vocab")


def encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder (T5, BART: two transformer submodules)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


class PromptState(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(weight)


class Prompt(Adapter):
    """Prompt tuning (PEFT's ``PromptTuningConfig``).

    Arguments:
        num_virtual_tokens: how many virtual tokens to prepend, > 0.
        init: ``"random"`` (standard normal, PEFT's RANDOM), ``"text"`` (the
            embeddings of ``text``'s tokens, repeated or cut to length, PEFT's
            TEXT), or ``"vocab"`` (embeddings of tokens sampled from the
            vocabulary, PEFT's SAMPLE_VOCAB).
        text, tokenizer: for ``init="text"``: the text and a tokenizer (any
            callable returning ``{"input_ids": [...]}``).
    """

    kind = "prompt"

    def __init__(self, num_virtual_tokens: int, init: str = "random", text: str | None = None,
                 tokenizer=None):
        check_virtual_tokens(num_virtual_tokens)
        if init not in _INITS:
            raise RuleError(f"Prompt init={init!r} must be one of {_INITS}")
        if init == "text" and (not text or tokenizer is None):
            raise RuleError('Prompt(init="text") needs text="..." and a tokenizer')
        self.num_virtual_tokens, self.init, self.text, self.tokenizer = num_virtual_tokens, init, text, tokenizer

    def default_selector(self):
        return input_embeddings()

    def no_site_hint(self):
        return "the model has no input-embedding op peftc can see (model.get_input_embeddings())"

    def unsupported(self, site):
        if not site.input_embedding:
            return "Prompt goes on the model's input-embedding lookup (peftc.input_embeddings())"
        return None

    def init_states(self, sites, model):
        check_positions(model, self.num_virtual_tokens, "Prompt")
        table = model.get_input_embeddings().weight
        n = self.table_rows(model)
        with torch.no_grad():
            if self.init == "random":
                weight = torch.randn(n, table.shape[1], device=table.device)
            else:
                ids = self._init_ids(table.shape[0], n).to(table.device)
                weight = table[ids].detach().float().clone()
        state = PromptState(weight.float())
        return [("prompt", state) for _ in sites]

    def table_rows(self, model: nn.Module) -> int:
        """The table's rows on ``model``: ``2n`` on an encoder-decoder (PEFT's two transformer
        submodules; the encoder reads the first ``n``), else ``n``."""
        return self.num_virtual_tokens * (2 if encoder_decoder(model) else 1)

    def _init_ids(self, vocab: int, n: int) -> torch.Tensor:
        if self.init == "vocab":
            return torch.randint(0, vocab, (n,))
        ids = list(self.tokenizer(self.text)["input_ids"])
        if not ids:
            raise RuleError(f"Prompt init text {self.text!r} tokenizes to nothing")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        return torch.tensor(ids, dtype=torch.long)

    def rewrite_inputs(self, model, state, kwargs):
        if "input_ids" not in kwargs and kwargs.get("encoder_outputs") is not None and encoder_decoder(model):
            # a generation step: the encoder ran already, prompt and all; its mask must still show the prompt
            return self.rewrite_decode_inputs(model, state, kwargs)
        if "input_ids" not in kwargs:
            raise RuleError("prompt tuning needs input_ids (it looks up their embeddings itself)")
        if "position_ids" in kwargs:
            if "past_key_values" not in kwargs:
                raise RuleError("prompt tuning numbers positions itself (virtual tokens first); drop position_ids")
            del kwargs["position_ids"]  # generating: positions follow the cache, virtual tokens first (as in PEFT)
        ids = kwargs.pop("input_ids")
        embeds = model.get_input_embeddings()(ids)
        batch, n = ids.shape[0], self.num_virtual_tokens
        prompt = self.virtual_tokens(state).unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        pads = {"attention_mask": 1, "token_type_ids": 0}
        for name, value in pads.items():
            if name in kwargs:
                t = kwargs[name]
                kwargs[name] = torch.cat([t.new_full((batch, n), value), t], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() >= 2 and not encoder_decoder(model):
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return kwargs

    def virtual_tokens(self, state: nn.Module) -> torch.Tensor:
        """The ``[n, hidden]`` embeddings put in front of the input's (traced with it)."""
        return state.embedding[: self.num_virtual_tokens]

    def rewrite_decode_inputs(self, model, state, kwargs):
        # The cache holds the virtual tokens: only the mask must still show them.
        kwargs.pop("position_ids", None)
        lead_with_ones(kwargs, "attention_mask", self.num_virtual_tokens)
        return kwargs

    def generation_tokens(self):
        return self.num_virtual_tokens, self.num_virtual_tokens

    def saved_state(self, site, state, prefix):
        return {"prompt_embeddings": state.embedding}

    def config(self):
        return {"kind": self.kind, "num_virtual_tokens": self.num_virtual_tokens, "init": self.init,
                "text": self.text}

    def __repr__(self):
        return f"Prompt(num_virtual_tokens={self.num_virtual_tokens}, init={self.init!r})"
