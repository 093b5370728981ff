"""Assertions for adapter kinds: merge, unmerge, and save/load keep the outputs.

Each assertion compiles a *copy* of the model (``backend="eager"`` unless told
otherwise), nudges every adapter parameter by ``perturb`` times standard normal
noise (adapters usually start as the identity, which would make every check
pass vacuously), and compares outputs in float64. Tolerances follow the
model's dtype (:data:`TOLERANCES`): ``|a - b| <= tol * max(1, |b|max) + tol * |b|``.

A failure is an ``AssertionError`` that names the check, the output and how far
off it is, and, for merges, every adapted site in graph order with the largest
difference just after it (merged against unmerged), the first site off marked.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import fx, nn

from ..trace import call_inputs, with_defaults

TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

__all__ = [
    "TOLERANCES",
    "assert_merge_equivalent",
    "assert_roundtrip",
    "assert_unmerge_restores",
]


def assert_merge_equivalent(model: nn.Module, rules, inputs, *, atol: float | None = None,
                            rtol: float | None = None, perturb: float = 0.1, seed: int = 0,
                            copy_model: bool = True, require_effect: bool = True,
                            backend="eager", **compile_kwargs) -> None:
    """Merging the adapters into the weights leaves the outputs unchanged.

    Compiles ``model`` with ``rules``, runs ``inputs`` unmerged, merges, and runs
    them again through the compiled model and through the model's own forward.

    Arguments:
        inputs: a tuple of positional inputs, a dict of keyword inputs, or a tensor (None:
            the default batch of a transformers text model, as for ``peftc.compile``).
        atol, rtol: override the dtype's tolerance (see module docs).
        perturb: std of the noise added to every adapter parameter first (0: none).
        seed: seeds that noise.
        copy_model: work on a deep copy (default), leaving ``model`` untouched.
        require_effect: fail when the adapters don't change the outputs at all,
            since then the check proves nothing.
        compile_kwargs: passed to ``peftc.compile`` (``adapter_name``, ``modules_to_save``).

    Raises:
        AssertionError: an adapter kind declares no parameters or can't merge,
            merging raised, or an output moved by more than the tolerance.
    """
    run = _Run(model, rules, inputs, copy_model, perturb, seed, backend, compile_kwargs)
    run.require_mergeable()
    before = run.node_values()
    unmerged = run.call()
    if require_effect:
        run.require_effect(unmerged)
    run.merge()
    after = run.node_values()
    failures = run.compare(unmerged, run.call(), "merged (compiled)", atol, rtol)
    failures += run.compare(unmerged, run.call_model(), "merged (the model's own forward)", atol, rtol)
    if failures:
        table = run.site_table(before, after, atol, rtol)
        raise AssertionError(
            f"merge changed the outputs of {run.what}:\n  " + "\n  ".join(failures) + table
            + "\nThe adapter kind's merge_delta doesn't match what its emit computes."
        )


def assert_unmerge_restores(model: nn.Module, rules, inputs, *, atol: float | None = None,
                            rtol: float | None = None, perturb: float = 0.1, seed: int = 0,
                            copy_model: bool = True, backend="eager", **compile_kwargs) -> None:
    """Merge then unmerge gives back every base parameter (within rounding) and the unmerged outputs.

    Same arguments as :func:`assert_merge_equivalent`. Checks that unmerge
    removes parameters merge created (BitFit's biases) and restores the others.
    """
    run = _Run(model, rules, inputs, copy_model, perturb, seed, backend, compile_kwargs)
    run.require_mergeable()
    params = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    unmerged = run.call()
    run.merge()
    run.unmerge()
    now = dict(run.model.named_parameters())
    failures = []
    added, removed = sorted(now.keys() - params.keys()), sorted(params.keys() - now.keys())
    if added or removed:
        failures.append(f"the model's parameters changed: added {added}, removed {removed}")
    worst = None
    for name in params.keys() & now.keys():
        old, new = params[name].double(), now[name].detach().double()
        if old.shape != new.shape:
            failures.append(f"{name}: shape {tuple(old.shape)} became {tuple(new.shape)}")
            continue
        tol = _tol(params[name].dtype, atol, rtol, old)
        excess, off = _excess(new, old, *tol)
        if excess > 0 and (worst is None or off > worst[1]):
            worst = (name, off, tol[0])
    if worst is not None:
        name, off, allowed = worst
        failures.append(f"parameter {name} is off by {off:.3g} after unmerge (allowed about {allowed:.3g}); "
                        f"adapted by {run.placement_of(name)}")
    failures += run.compare(unmerged, run.call(), "after unmerge", atol, rtol)
    if failures:
        raise AssertionError(
            f"merge + unmerge did not restore {run.what}:\n  " + "\n  ".join(failures)
            + "\nA multiplicative kind must override unmerge_delta (it gets the merged weights)."
        )


def assert_roundtrip(model: nn.Module, rules, inputs, *, directory=None, atol: float | None = None,
                     rtol: float | None = None, perturb: float = 0.1, seed: int = 0,
                     backend="eager", **compile_kwargs) -> None:
    """``save_pretrained`` then load gives the same adapter state and the same outputs.

    Loads with ``peftc.from_pretrained`` into a fresh copy of ``model``, passing
    ``rules`` (adapters on pattern-matched sites can't be found again from names).

    Arguments:
        directory: where to save (default: a temporary directory, removed after).
        Others as :func:`assert_merge_equivalent`.
    """
    pristine = _copy(model)
    run = _Run(model, rules, inputs, True, perturb, seed, backend, compile_kwargs)
    expected = run.call()
    name = compile_kwargs.get("adapter_name", "default")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(directory) if directory is not None else Path(tmp)
        try:
            run.cm.save_pretrained(root)
        except Exception as e:
            raise AssertionError(f"save_pretrained failed for {run.what}: {type(e).__name__}: {e}") from e
        folder = root if name == "default" else root / name
        import peftc  # the public entry points, whichever module defines them

        try:
            loaded = peftc.from_pretrained(pristine, str(folder), example_inputs=inputs, backend=backend,
                                           adapter_name=name, rules=rules)
        except Exception as e:
            raise AssertionError(f"loading the saved adapter of {run.what} failed: "
                                 f"{type(e).__name__}: {e}") from e
        loaded.eval()
        failures = _compare_states(run.cm, loaded)
        with torch.no_grad():
            got = loaded(*run.args, **run.kwargs)
        failures += run.compare(expected, got, "after save and load", atol, rtol)
    if failures:
        raise AssertionError(f"save/load did not round-trip {run.what}:\n  " + "\n  ".join(failures))


# -- the shared run ---------------------------------------------------------------


class _Run:
    """A compiled copy of the model with perturbed adapters, and the calls the checks make."""

    def __init__(self, model, rules, inputs, copy_model, perturb, seed, backend, compile_kwargs):
        import peftc  # the public entry points, whichever module defines them

        self.model = _copy(model) if copy_model else model
        self.model.eval()
        self.args, self.kwargs = call_inputs(self.model, inputs)
        self.cm = peftc.compile(self.model, rules, example_inputs=inputs, backend=backend, **compile_kwargs)
        self.cm.eval()
        self.placements = list(self.cm.sites)
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        self.what = f"{type(model).__name__} ({str(dtype).removeprefix('torch.')}, {len(self.placements)} sites)"
        for p in self.placements:
            if p.num_params == 0:
                raise AssertionError(
                    f"adapter kind {type(p.adapter).__name__} ({p.adapter!r}) declares no parameters at site {p.site}: "
                    "init_state must return a module holding at least one nn.Parameter (buffers don't train)"
                )
        self.base = self.call_model()
        if perturb:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.cm.peftc.adapters.parameters():
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    p.add_((perturb * noise).to(p.dtype).to(p.device))

    def call(self):
        with torch.no_grad():
            return self.cm(*self.args, **self.kwargs)

    def call_model(self):
        """The user's model called directly: the reference, so peftc's warning that a call
        bypasses the adapters doesn't apply."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".* was called directly, without its adapters")
            return self.model(*self.args, **self.kwargs)

    def require_mergeable(self):
        bad = sorted({type(p.adapter).__name__ for p in self.placements if not p.adapter.mergeable})
        if bad:
            raise AssertionError(f"adapter kinds {bad} define no merge_delta, so they can't merge; "
                                 "there is nothing to check")

    def require_effect(self, out):
        diffs = [(a - b).abs().max().item() for (_, a), (_, b) in zip(_leaves(out), _leaves(self.base), strict=False)
                 if a.shape == b.shape and a.is_floating_point() and a.numel()]
        if diffs and max(diffs) == 0:
            raise AssertionError(
                f"the adapters leave the outputs of {self.what} exactly unchanged even after perturbing their "
                "parameters, so a merge check would prove nothing: check that emit returns the node it "
                "built (or rewires the op with b.replace_input), or pass require_effect=False"
            )

    def merge(self):
        self._step("merge", self.cm.merge)

    def unmerge(self):
        self._step("unmerge", self.cm.unmerge)

    def _step(self, what, fn):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except Exception as e:
            sites = "\n    ".join(_label(p) for p in self.placements[:8])
            raise AssertionError(
                f"{what} raised {type(e).__name__} for {self.what}: {e}\n  sites:\n    {sites}"
            ) from e

    def compare(self, expected, got, label, atol, rtol) -> list[str]:
        out = []
        want, have = _leaves(expected), _leaves(got)
        if [n for n, _ in want] != [n for n, _ in have]:
            return [f"{label}: outputs {[n for n, _ in have]} instead of {[n for n, _ in want]}"]
        for (name, a), (_, b) in zip(want, have, strict=True):
            if a.shape != b.shape:
                out.append(f"{label}: {name} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
                continue
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    out.append(f"{label}: {name} differs ({int((a != b).sum())} of {a.numel()} elements)")
                continue
            ref = a.double()
            tol = _tol(a.dtype, atol, rtol, ref)
            excess, off = _excess(b.double(), ref, *tol)
            if excess > 0:
                index = _worst_index(b.double(), ref)
                out.append(f"{label}: {name} is off by {off:.3g} (max |difference|, at index {index}; "
                           f"allowed {tol[0]:.3g} + {tol[1]:.3g}*|value|, {str(a.dtype).removeprefix('torch.')})")
        return out

    # -- locating the site -----------------------------------------------------------

    def node_values(self) -> dict[str, torch.Tensor] | None:
        """Every floating-point value the graph computes for the inputs, by node name (None if unknown).

        The values only feed the site table of a failure message, so a run that can't record
        them gives None rather than an error of its own.
        """
        gm = self.cm.graph_module(*self.args, **self.kwargs)
        kwargs = with_defaults(self.model, dict(self.kwargs))
        leaves = [*self.args, *kwargs.values()]
        values: dict[str, torch.Tensor] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if (n.op == "call_function" and "peftc" not in n.meta and isinstance(out, torch.Tensor)
                        and out.is_floating_point()):
                    values[n.name] = out.detach().clone()
                elif n.op == "output":
                    flat = [t.detach().flatten() for _, t in _leaves(out) if t.is_floating_point()]
                    if flat:
                        values[_OUTPUT] = torch.cat([f.to(flat[0].dtype) for f in flat])
                return out

        try:
            with torch.no_grad():
                Recorder(gm).run(*leaves)
        # The recorder binds the inputs to the graph's placeholders by position, which the model's
        # own call does through its keyword order and input boundary: where the two differ (inputs
        # rewritten at the boundary, non-tensor leaves) the graph's input guards raise
        # AssertionError, a missing placeholder or an op on mismatched shapes RuntimeError, and a
        # non-tensor leaf where a tensor is read TypeError or AttributeError. Building the graph
        # (graph_module above) is not guarded: its PeftcError is the real failure.
        except (RuntimeError, AssertionError, TypeError, AttributeError):
            return None
        return values

    def site_table(self, before, after, atol, rtol) -> str:
        """Each site in graph order with the largest merged-vs-unmerged difference just after it."""
        if not before or not after:
            return ""
        gm = self.cm.graph_module(*self.args, **self.kwargs)
        nodes = {n.name: n for n in gm.graph.nodes}
        order = {name: i for i, name in enumerate(nodes)}
        rows = []
        for p in self.placements:
            names = [n for n in p.site.nodes if n in nodes]
            if not names:
                continue
            watch = set()
            for name in names:
                if p.adapter.position == "before":
                    watch.add(name)
                else:
                    watch.update(u.name if u.op == "call_function" else _OUTPUT for u in nodes[name].users)
            diffs = []
            for w in watch:
                if w in before and w in after and before[w].shape == after[w].shape:
                    ref = before[w].double()
                    tol = _tol(before[w].dtype, atol, rtol, ref)
                    excess, off = _excess(after[w].double(), ref, *tol)
                    diffs.append((excess > 0, off))
            bad = any(b for b, _ in diffs)
            off = max((d for _, d in diffs), default=None)
            rows.append((order[names[0]], _label(p), off, bad))
        if not rows:
            return ""
        rows.sort()
        first = next((i for i, r in enumerate(rows) if r[3]), None)
        lines = []
        for i, (_, label, off, _) in enumerate(rows):
            value = "  (not measured)" if off is None else f"  off by {off:.3g}"
            mark = "   <-- first site off" if i == first else ""
            lines.append(f"    {label}{value}{mark}")
        return ("\n  sites in graph order (largest merged-vs-unmerged difference just after each):\n"
                + "\n".join(lines))

    def placement_of(self, param: str) -> str:
        hits = [p for p in self.placements if param.startswith(p.site.path + ".") or not p.site.path]
        return _label(hits[-1]) if hits else "no adapted site"


_OUTPUT = "<graph output>"


def _label(p) -> str:
    """``<adapter name>: <spec> at <site>``, naming the class when the spec's repr doesn't."""
    spec, cls = repr(p.adapter), type(p.adapter).__name__
    if not spec.startswith(cls):
        spec = f"{spec} (class {cls})"
    return f"{p.adapter_name}: {spec} at {p.site}"


# -- helpers ----------------------------------------------------------------------


def _copy(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model)


def _leaves(out, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, Mapping):
        return [leaf for k, v in out.items() for leaf in _leaves(v, f"{name}.{k}")]
    if isinstance(out, (list, tuple)):
        return [leaf for i, v in enumerate(out) for leaf in _leaves(v, f"{name}[{i}]")]
    return []


def _tol(dtype: torch.dtype, atol: float | None, rtol: float | None, ref: torch.Tensor) -> tuple[float, float]:
    tol = TOLERANCES.get(dtype, 1e-5)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() and torch.isfinite(ref).all() else 1.0
    return (atol if atol is not None else tol * scale), (rtol if rtol is not None else tol)


def _excess(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    """(largest amount by which an element exceeds its tolerance, largest |difference|); NaN-aware."""
    if got.numel() == 0:
        return 0.0, 0.0
    nan_mismatch = got.isnan() != ref.isnan()
    if nan_mismatch.any():
        return float("inf"), float("inf")
    diff = (got - ref).abs().nan_to_num(0.0)
    excess = (diff - (atol + rtol * ref.abs().nan_to_num(0.0))).max().item()
    return excess, diff.max().item()


def _worst_index(got: torch.Tensor, ref: torch.Tensor) -> tuple:
    diff = (got - ref).abs().nan_to_num(float("inf"))
    flat = int(diff.argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))


def _compare_states(cm, loaded) -> list[str]:
    out = []
    theirs = {p.site.weight_path: p for p in loaded.sites}
    for p in cm.sites:
        q = theirs.get(p.site.weight_path)
        if q is None:
            out.append(f"site {p.site} has no adapter after loading")
            continue
        mine, got = dict(p.state.named_parameters()), dict(q.state.named_parameters())
        for name, value in mine.items():
            if name not in got:
                out.append(f"site {p.site}: parameter {name} missing after loading")
            elif got[name].shape != value.shape or not torch.equal(got[name].detach().cpu(), value.detach().cpu()):
                off = ((got[name].detach().double().cpu() - value.detach().double().cpu()).abs().max().item()
                       if got[name].shape == value.shape else "shape")
                out.append(f"site {p.site}: parameter {name} differs after loading (off by {off})")
    return out
