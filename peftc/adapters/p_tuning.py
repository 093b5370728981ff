"""P-tuning: prompt tuning whose virtual tokens come out of a small trained encoder.

The input boundary is prompt tuning's (:mod:`peftc.adapters.prompt`); only the
virtual tokens differ. They are computed, in the traced graph, from a table of
``n`` learned rows by PEFT's reparameterising encoder::

    MLP:   %t = linear(relu(linear(relu(linear(%embedding, W0, b0)), W2, b2)), W4, b4)
    LSTM:  %h = aten.lstm(unsqueeze(%embedding, 0), ..., bidirectional=True)[0]
           %t = linear(relu(linear(%h, W0, b0)), W2, b2)[0]
    %x = aten.cat([expand(unsqueeze(%t, 0), [B, -1, -1]), embedding(%table, %input_ids)], 1)

The encoder only serves training: PEFT saves its output (``prompt_embeddings``,
``[n, hidden]``) and loads that into a bare table. A loaded adapter is
therefore *folded*: its table is the encoder's output and no encoder is built
(PEFT's ``inference_mode=True``); trained further, the table trains directly.

On an encoder-decoder model the table holds ``2n`` rows, as prompt tuning's
does (PEFT's two transformer submodules): the encoder runs over all ``2n``
(so an LSTM's first ``n`` outputs see the last ``n`` rows too), the model's
encoder reads the first ``n`` outputs, and all ``2n`` are saved.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RuleError
from .base import check_positions, check_virtual_tokens
from .prompt import Prompt

ENCODERS = ("mlp", "lstm")
MLP_LAYERS = 2  # PEFT's MLP encoder has exactly two hidden layers


class PTuningState(nn.Module):
    """The ``[rows, dim]`` table (``2n`` rows on an encoder-decoder) and, unless folded, PEFT's encoder (same parameter names)."""

    def __init__(self, weight: torch.Tensor, hidden: int, encoder: str | None, num_layers: int, dropout: float):
        super().__init__()
        dim = weight.shape[1]
        self.embedding = nn.Parameter(weight)
        self.lstm_head = None
        self.mlp_head = None
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers, dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))
        self.to(weight.device)

    def forward(self) -> torch.Tensor:
        """The table's rows as encoded: ``[rows, dim]``."""
        x = self.embedding.unsqueeze(0)  # one sequence of n tokens, as PEFT encodes it
        if self.lstm_head is not None:
            x = self._lstm(x)
        if self.mlp_head is not None:
            x = self.mlp_head(x)
        return x[0]


    def _lstm(self, x: torch.Tensor) -> torch.Tensor:
        """``self.lstm_head(x)[0]``, written as the op it runs: export reads the weights as the
        parameters they are (``nn.LSTM`` hands the op a cached list of them)."""
        lstm = self.lstm_head
        zeros = x.new_zeros(2 * lstm.num_layers, 1, lstm.hidden_size)
        weights = [w for layer in lstm.all_weights for w in layer]
        return torch.lstm(x, (zeros, zeros), weights, True, lstm.num_layers, lstm.dropout, self.training,
                          True, True)[0]


class PTuning(Prompt):
    """P-tuning (PEFT's ``PromptEncoderConfig``).

    Arguments:
        num_virtual_tokens: how many virtual tokens to prepend, > 0.
        hidden_size: the encoder's hidden size (``encoder_hidden_size``); None: the
            model's embedding width.
        encoder: ``"mlp"`` (three linear layers with ReLU between them) or ``"lstm"``
            (a bidirectional LSTM, then two linear layers), PEFT's reparameterisation types.
        num_layers: the LSTM's layers (the MLP always has two hidden layers).
        dropout: dropout between the LSTM's layers (the MLP has none).
        folded: the table holds the encoder's output and no encoder is built, as when
            an adapter is loaded from a checkpoint (PEFT's ``inference_mode=True``).
    """

    kind = "p_tuning"

    def __init__(self, num_virtual_tokens: int, hidden_size: int | None = None, encoder: str = "mlp",
                 num_layers: int = 2, dropout: float = 0.0, folded: bool = False):
        check_virtual_tokens(num_virtual_tokens)
        if encoder not in ENCODERS:
            raise RuleError(f"PTuning encoder={encoder!r} must be one of {ENCODERS} (PEFT's MLP or LSTM)")
        if hidden_size is not None and (isinstance(hidden_size, bool) or not isinstance(hidden_size, int)
                                        or hidden_size <= 0):
            raise RuleError(f"PTuning hidden_size={hidden_size!r} must be a positive integer or None")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise RuleError(f"PTuning num_layers={num_layers!r} must be a positive integer")
        if encoder == "mlp" and num_layers != MLP_LAYERS:
            raise RuleError(f"PTuning(encoder='mlp') has exactly {MLP_LAYERS} hidden layers; num_layers="
                            f"{num_layers} applies to encoder='lstm' only. Drop it, or use encoder='lstm'")
        if not 0.0 <= dropout < 1.0:
            raise RuleError(f"PTuning dropout={dropout!r} must be in [0, 1)")
        if encoder == "mlp" and dropout:
            raise RuleError("PTuning(encoder='mlp') has no dropout (PEFT's MLP encoder has none); "
                            "set dropout=0, or use encoder='lstm'")
        super().__init__(num_virtual_tokens)
        self.hidden_size, self.encoder, self.num_layers = hidden_size, encoder, num_layers
        self.dropout, self.folded = float(dropout), bool(folded)

    def init_states(self, sites, model):
        check_positions(model, self.num_virtual_tokens, "PTuning")
        table = model.get_input_embeddings().weight
        weight = torch.randn(self.table_rows(model), table.shape[1], device=table.device)  # nn.Embedding's init
        state = PTuningState(weight, self.hidden_size or table.shape[1], None if self.folded else self.encoder,
                             self.num_layers, self.dropout)
        return [("prompt", state) for _ in sites]

    def virtual_tokens(self, state):
        return state()[: self.num_virtual_tokens]  # the encoder (LSTM: bidirectional) runs over all rows

    def saved_state(self, site, state, prefix):
        if self.folded:
            return {"prompt_embeddings": state.embedding}
        training = state.training
        try:  # the encoder's output without dropout, whatever mode the model is in
            with torch.no_grad():
                return {"prompt_embeddings": state.eval()()}
        finally:
            state.train(training)

    def config(self):
        return {"kind": self.kind, "num_virtual_tokens": self.num_virtual_tokens, "hidden_size": self.hidden_size,
                "encoder": self.encoder, "num_layers": self.num_layers, "dropout": self.dropout,
                "folded": self.folded}

    def __repr__(self):
        folded = ", folded=True" if self.folded else ""
        return (f"PTuning(num_virtual_tokens={self.num_virtual_tokens}, hidden_size={self.hidden_size}, "
                f"encoder={self.encoder!r}{folded})")
