"""VeRA (PEFT's ``VeraConfig``): one pair of frozen random projections shared by every site,
and per site two trained scaling vectors.

``vera_A [r, in_max]`` and ``vera_B [out_max, r]`` are drawn once per adapter from
``prng_key`` (Kaiming-uniform, as PEFT draws them, sized for the largest site) and are
buffers, not parameters. A site with ``[out, in]`` weight uses their top-left corner::

    y = aten.linear(x, W, b)     xg = aten.where(row_mask, x, 0)               # training only
                          ==>    xd = aten.dropout(xg, p, True)                # training only
                                 a  = aten.linear(xd, aten.slice(vera_A, 1, 0, in))
                                 d  = aten.linear(a * lambda_d, aten.slice(vera_B, 0, 0, out))
                                 y2 = aten.add(y, d * lambda_b)
                                 y3 = aten.where(gate, y2, y)                  # per row (peftc adds it)

Sharing: :meth:`VeRA.init_states` gives each site its own state, each holding the one
:class:`Projections` module as a submodule, so the graph reads the same buffers from every
site. Saved as PEFT saves it: ``<site>.vera_lambda_b``, ``<site>.vera_lambda_d`` and, with
``save_projection``, ``base_model.vera_A`` and ``base_model.vera_B`` once; without it,
loading draws the projections again from the key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RuleError
from .base import Adapter, widen

aten = torch.ops.aten
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # PEFT's keys, outside every site's


class Projections(nn.Module):
    """The shared frozen ``vera_A [r, in_max]`` and ``vera_B [out_max, r]``."""

    def __init__(self, r: int, out_max: int, in_max: int, key: int, device):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        self.register_buffer("vera_A", _kaiming_uniform((r, in_max), generator).to(device))
        self.register_buffer("vera_B", _kaiming_uniform((out_max, r), generator).to(device))


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform in ``±sqrt(6 / fan_in)`` (fan_in: ``shape[1]``), drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAState(nn.Module):
    """One site's ``vera_lambda_b [out]`` and ``vera_lambda_d [r]``, and the shared projections."""

    def __init__(self, projections: Projections, out_features: int, r: int, dtype, device):
        super().__init__()
        self.vera_lambda_b = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        self.vera_lambda_d = nn.Parameter(torch.empty(r, dtype=dtype, device=device))
        self.projections = projections


class VeRA(Adapter):
    """Vector-based random-matrix adaptation of linear-like ops.

    Arguments:
        r: rank of the shared projections, > 0 (PEFT's default is 256).
        dropout: dropout probability on the adapter's input, in training mode only.
        d_initial: the value ``vera_lambda_d`` starts at (``vera_lambda_b`` starts at 0).
        init: ``True`` (as above: a no-op at the start) or ``False`` (PEFT's untouched
            draw: ``lambda_b`` ones, ``lambda_d`` standard normal).
        prng_key: the seed of the projections.
        save_projection: save the projections with the adapter (else they are drawn again on loading).
    """

    kind = "vera"
    gates_itself = False  # peftc selects the output with the gate

    def __init__(self, r: int = 256, dropout: float = 0.0, d_initial: float = 0.1, init: bool = True,
                 prng_key: int = 0, save_projection: bool = True):
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise RuleError(f"VeRA rank r={r!r} must be a positive integer (try r=256)")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise RuleError(f"VeRA dropout={dropout!r} must be in [0, 1)")
        if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
            raise RuleError(f"VeRA d_initial={d_initial!r} must be a finite number (try 0.1)")
        if isinstance(prng_key, bool) or not isinstance(prng_key, int):
            raise RuleError(f"VeRA prng_key={prng_key!r} must be an integer seed")
        for what, value in (("init", init), ("save_projection", save_projection)):
            if not isinstance(value, bool):
                raise RuleError(f"VeRA {what}={value!r} must be True or False")
        self.r, self.dropout, self.d_initial, self.init = r, dropout, d_initial, init
        self.prng_key, self.save_projection = prng_key, save_projection

    @classmethod
    def from_peft(cls, config: dict) -> VeRA:
        """The spec a PEFT ``VeraConfig`` dict describes."""
        return cls(r=config.get("r", 256), dropout=config.get("vera_dropout", 0.0),
                   d_initial=config.get("d_initial", 0.1), init=config.get("init_weights", True),
                   prng_key=config.get("projection_prng_key", 0),
                   save_projection=config.get("save_projection", True))

    def unsupported(self, site):
        if not site.is_linear:
            return f"VeRA adapts linear-like ops (linear, addmm, mm, matmul), not {site.op}"
        return None

    def init_states(self, sites, model):
        out_max = max(s.out_features for s in sites)
        in_max = max(s.in_features for s in sites)
        projections = Projections(self.r, out_max, in_max, self.prng_key, sites[0].device)
        states = []
        for site in sites:
            dtype = site.dtype if site.dtype == torch.float64 else torch.float32
            state = VeRAState(projections.to(dtype), site.out_features, self.r, dtype, site.device)
            with torch.no_grad():
                if self.init:
                    state.vera_lambda_b.zero_()
                    state.vera_lambda_d.fill_(self.d_initial)
                else:
                    state.vera_lambda_b.fill_(1.0)
                    state.vera_lambda_d.normal_()
            states.append((site.key, state))
        return states

    def emit(self, b, site):
        state_dtype = b.state.vera_lambda_b.dtype
        x = b.cast(b.x, state_dtype)
        if b.training:  # an inactive adapter's rows pass no gradient, even 0 @ NaN
            x = b.call(aten.where.ScalarOther, b.row_mask(b.x), x, 0)
        if b.training and self.dropout > 0:
            x = b.call(aten.dropout.default, x, self.dropout, True)
        a = b.call(aten.slice.Tensor, b.param("projections.vera_A"), 1, 0, site.in_features)
        a = b.call(aten.mul.Tensor, b.call(aten.linear.default, x, a), b.param("vera_lambda_d"))
        d = b.call(aten.slice.Tensor, b.param("projections.vera_B"), 0, 0, site.out_features)
        d = b.call(aten.mul.Tensor, b.call(aten.linear.default, a, d), b.param("vera_lambda_b"))
        return b.cast(b.call(aten.add.Tensor, b.y, d), site.dtype)

    def merge_delta(self, site, state, weights):
        a = widen(state.projections.vera_A[:, : site.in_features])
        d = widen(state.projections.vera_B[: site.out_features])
        delta = (widen(state.vera_lambda_b.detach())[:, None] * d) @ (widen(state.vera_lambda_d.detach())[:, None] * a)
        return {site.weight_name: delta if site.layout == "out_in" else delta.T}

    def saved_state(self, site, state, prefix):
        out = {f"{prefix}vera_lambda_b": state.vera_lambda_b, f"{prefix}vera_lambda_d": state.vera_lambda_d}
        if self.save_projection:
            out.update(zip(PROJECTION_KEYS, (state.projections.vera_A, state.projections.vera_B), strict=True))
        return out

    def config(self):
        return {"kind": self.kind, "r": self.r, "dropout": self.dropout, "d_initial": self.d_initial,
                "init": self.init, "prng_key": self.prng_key, "save_projection": self.save_projection}

    def peft_fields(self) -> dict:
        """This spec's options under PEFT's names."""
        return {"r": self.r, "vera_dropout": self.dropout, "d_initial": self.d_initial, "init_weights": self.init,
                "projection_prng_key": self.prng_key, "save_projection": self.save_projection}

    def __repr__(self):
        return f"VeRA(r={self.r}, prng_key={self.prng_key})"
