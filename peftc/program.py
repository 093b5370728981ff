"""One graph per input signature: trace, insert adapter nodes, lower; and the cache of them.

A :class:`Program` is one trace of the model (a signature: train/eval mode,
input names, dtypes and ranks, active input rewrites) with the adapted graph
module built from it and the callable ``torch.compile`` lowered it to.
:class:`Programs` is the cache a compiled model keeps: it builds programs
lazily, the first time a call needs one, and rebuilds them all, by one
function, whenever the adapters or the merge state change.

Which adapters are active lives in gate tensors, not in the graph, so
switching adapters neither retraces nor recompiles. Only prompt and prefix
adapters, which change sequence lengths, select a program of their own.
Batch and sequence dims are symbolic, so new shapes reuse a program; new
signatures (another dtype, rank or constant argument) each add one, and the
cache keeps the :data:`MAX_SIGNATURES` most recently used, dropping the
least recently used beyond that (traced again if it comes back). The
graphs hold the state's :attr:`~peftc.state.AdapterState.graph_placements`:
with a :class:`~peftc.state.Reserve`, every reserved slot, so that adapters
written into slots later change no graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import fx, nn

from .boundary import Boundary
from .errors import PeftcError
from .match import discover
from .optimize import Optimize
from .passes.bias import attach_biases, detach_biases
from .passes.builder import STATE_ROOT
from .passes.checkpoint import Checkpointing, checkpointed
from .passes.compact import compact, forget_sources, sources, sources_run_by
from .passes.inline import inline_grad_regions
from .passes.input_grads import requiring_input_grads
from .passes.insert import insert_adapters, strip_adapters
from .passes.lower import lower
from .passes.merge import Folded
from .passes.quantize import quantize_reads, restore_reads
from .passes.shard import Sharding, sharded
from .passes.swap import swap_params
from .state import AdapterState
from .trace import Trace, flatten, signature, trace

MAX_SIGNATURES = 32  # signatures (with their programs) a compiled model keeps; least recently used go first


@dataclass
class Program:
    """A trace, the adapted graph module built from it, and the callable it was lowered to."""

    trace: Trace
    gm: fx.GraphModule
    fn: Callable
    traced_merged: bool = False  # traced while merged: its graph may read merge-created biases


def graph_of(t: Trace) -> fx.GraphModule:
    """A fresh graph module of ``t`` with its grad-mode regions inlined (sites inside them visible)."""
    gm = t.module()
    inline_grad_regions(gm)
    return gm


class Programs:
    """The programs of one compiled model, by signature.

    Arguments:
        model: the user's model; state: its adapters; backend: for :func:`~peftc.passes.lower.lower`.
        first: the trace ``compile`` made; rules find their sites in it, and the first
            call that fits it reuses it instead of tracing again.
        optimize: which optimisation passes lowering runs (default: :class:`~peftc.optimize.Optimize`'s).
    """

    def __init__(self, model: nn.Module, state: AdapterState, backend, first: Trace,
                 optimize: Optimize | None = None):
        self._model, self._state, self._backend = model, state, backend
        self._cache: dict[tuple, list[Program]] = {}
        self._first: Trace | None = first
        self._catalog = first
        self._checkpointing: Checkpointing | None = None
        self._input_grads: str | None = None
        self._sharding: Sharding | None = None
        self._optimize = optimize if optimize is not None else Optimize()

    def copy_for(self, model: nn.Module, state: AdapterState) -> Programs:
        """An empty cache for a copy of the model and its adapters (``copy.deepcopy`` of a
        compiled model): the copy's own trace to find sites in, taken on the inputs of this
        one's, no programs yet (each is built on the first call that needs it), and the same
        checkpointing and input-grad settings."""
        t = self._catalog
        args, kwargs = t.ep.example_inputs
        if t.boundary:  # traced through the input boundary, which took the keyword inputs as one dict
            args, kwargs = (), dict(args[0])
        new = Programs(model, state, self._backend, trace(model, tuple(args), dict(kwargs), t.signature),
                       self._optimize)
        new._first = None  # the copy may be merged; its programs are traced as calls come
        new._checkpointing, new._input_grads = self._checkpointing, self._input_grads
        return new

    def __len__(self) -> int:
        return sum(len(programs) for programs in self._cache.values())

    def __iter__(self) -> Iterator[Program]:
        return (p for programs in list(self._cache.values()) for p in programs)

    def traces(self) -> list[Trace]:
        """Every trace held: the built programs', then the first (possibly unbuilt)."""
        out = [p.trace for p in self]
        return out + [t for t in (self._first, self._catalog) if t is not None and t not in out]

    def catalog(self) -> fx.GraphModule:
        """A graph of the first trace, for finding the sites of new rules (a throwaway: fx's
        copies of its generated source are dropped at once)."""
        before = sources()
        gm = graph_of(self._catalog)
        forget_sources(sources() - before)
        return gm

    def select(self, args: tuple, kwargs: dict, rewrites: list, folded: Folded | None) -> Program:
        """The program for a call with these (normalised) inputs and active input rewrites."""
        flat = flatten(args, kwargs)
        sig = signature(flat, self._model.training)
        key = (sig, tuple(target for _, target in rewrites))
        for program in self._cache.get(key, ()):
            if program.trace.accepts(flat):
                self._cache[key] = self._cache.pop(key)  # most recently used last
                return program
        first, self._first = self._first, None  # reused at most once
        if first is not None and first.key == key and first.accepts(flat):
            t = first
        else:
            boundary = Boundary(self._model, self._state.root, rewrites) if rewrites else None
            with self._sharding.gathered() if self._sharding is not None else contextlib.nullcontext():
                t = trace(self._model, args, kwargs, sig, boundary)
        program = self._build(t, folded)
        self._cache[key] = [*self._cache.pop(key, []), program]
        while len(self._cache) > MAX_SIGNATURES:  # the least recently used signature goes
            del self._cache[next(iter(self._cache))]
        return program

    def rebuild(self, folded: Folded | None) -> None:
        """Bring every built graph up to date with the adapters and the merge state:
        strip what peftc inserted, then insert the adapters (unmerged) or wire the
        biases merging created (merged), and lower again. Rebuilding over and over must not
        grow memory: the erased nodes are freed (:func:`compact`), and so are the sources of
        the code the graphs ran before (:func:`forget_sources`)."""
        before, ran = sources(), self._sources()
        for program in self:
            restore_reads(program.gm)
            strip_adapters(program.gm)
            detach_biases(program.gm)
            compact(program.gm)
            self._adapt(program, folded)
        forget_sources(((sources() - before) | ran) - self._sources())

    def _sources(self) -> set[str]:
        return sources_run_by(m for p in self for m in (p.gm, p.fn))

    @property
    def checkpointing(self) -> Checkpointing | None:
        """The layers training graphs recompute in backward; None: none."""
        return self._checkpointing

    def set_checkpointing(self, checkpointing: Checkpointing | None) -> None:
        """Recompute ``checkpointing``'s layers in backward in every training graph (None: none).
        Built programs are lowered again from their adapted graphs; nothing is traced again."""
        self._checkpointing = checkpointing
        for program in self:
            if program.trace.training:
                program.fn = self._lower(program)

    @property
    def input_grads(self) -> str | None:
        """The module whose outputs every graph makes require grad; None: none."""
        return self._input_grads

    def set_input_grads(self, embeddings: str | None) -> None:
        """Make module ``embeddings``'s outputs require grad in every graph (None: stop).

        Raises:
            PeftcError: under ``torch.compile``, which can't return such a tensor from its graph.
        """
        if embeddings is not None and self._backend not in (None, "eager"):
            raise PeftcError(f"enable_input_require_grads: torch.compile (backend={self._backend!r}) can't make a "
                             "tensor inside its graph require grad. peftc doesn't need it: gradients reach the "
                             "adapters through frozen layers, and its checkpointing is non-reentrant. Don't call "
                             "it, or compile with backend='eager'")
        self._input_grads = embeddings
        for program in self:
            program.fn = self._lower(program)

    @property
    def sharding(self) -> Sharding | None:
        """The layers FSDP2 shards (graphs read them through the layers' calls); None: none."""
        return self._sharding

    def set_sharding(self, sharding: Sharding) -> None:
        """Read every state through the live model and each of ``sharding``'s layers through its
        FSDP2 hooks, in every graph; new traces are taken with the shards gathered.

        Raises:
            PeftcError: under ``torch.compile``, which would trace through FSDP2's hooks.
        """
        if self._backend not in (None, "eager"):
            raise PeftcError(f"FSDP sharding runs the graph eagerly, through FSDP2's hooks; compile the model with "
                             f"backend='eager' (not {self._backend!r}) before sharding it")
        self._sharding = sharding
        for program in self:
            program.fn = self._lower(program)

    @property
    def optimize(self) -> Optimize:
        """The optimisation passes lowering runs."""
        return self._optimize

    def set_optimize(self, optimize: Optimize) -> None:
        """Run ``optimize``'s passes from now on; built programs are lowered again (not traced)."""
        self._optimize = optimize
        for program in self:
            program.fn = self._lower(program)

    def drop(self, stale: Callable[[Program], bool]) -> None:
        """Forget the programs ``stale`` picks (they are traced again when needed)."""
        self._cache = {k: kept for k, ps in self._cache.items() if (kept := [p for p in ps if not stale(p)])}

    def clear(self) -> None:
        self._cache.clear()

    def _build(self, t: Trace, folded: Folded | None) -> Program:
        before = sources()
        gm = graph_of(t)
        gm.add_module(STATE_ROOT, self._state.root)
        program = Program(t, gm, gm, traced_merged=folded is not None)
        self._adapt(program, folded)
        forget_sources(sources() - before - sources_run_by([program.gm, program.fn]))
        return program

    def _adapt(self, program: Program, folded: Folded | None) -> None:
        gm, prefix = program.gm, program.trace.prefix
        if folded is not None:
            attach_biases(gm, self._model, folded.created_biases, prefix)
        else:
            state = self._state
            found = discover(gm, self._model, prefix, state.selectors)
            for name in state.names:
                swap_params(gm, state.saved(name), name, prefix)
            insert_adapters(gm, state.graph_placements, {s.weight_path: s for s in found},
                            training=program.trace.training)
        quantize_reads(gm, prefix, program.trace.training)  # last: adapters find the float linear a packed weight stands for
        program.fn = self._lower(program)

    def _lower(self, program: Program) -> Callable:
        gm, plan, prefix = program.gm, self._checkpointing, program.trace.prefix
        if self._sharding is not None:  # first: checkpointing recomputes the layer calls, hooks and all
            gm = sharded(gm, self._sharding, prefix)
        if self._input_grads is not None:
            gm = requiring_input_grads(gm, self._input_grads, prefix)
        gm = self._optimize.apply(gm, program.trace.training)
        if plan is not None and program.trace.training:
            gm = checkpointed(gm, plan, prefix)
        return lower(gm, self._backend, self._optimize.dynamic)
