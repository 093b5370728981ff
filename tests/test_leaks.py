"""Rebuilding graphs over and over holds no more than one rebuild does: the programs, their
nodes, the ``fx.Node`` objects alive in the process and fx's generated sources stay the same
over N lifecycle cycles."""

from __future__ import annotations

import gc
import warnings

import torch
from conftest import VOCAB, two_adapter_llama
from torch import fx

import peftc
from peftc.passes.compact import sources


def _live_nodes() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gc.get_objects() meets deprecated objects
        return sum(1 for o in gc.get_objects() if type(o) is fx.Node)


def test_lifecycle_cycles_hold_a_bounded_number_of_programs_and_nodes():
    cm, _ = two_adapter_llama()
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))

    def cycle():
        cm.merge()
        cm(input_ids=ids)
        cm.unmerge()
        cm.add_adapter("x", [peftc.LoRA(r=2, init=False).on(peftc.linear(r".*up_proj")),
                             peftc.BitFit().on(peftc.linear(r".*down_proj"))])
        cm.set_adapter(["x", "default"])
        cm(input_ids=ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "deleted the active adapter"
            cm.delete_adapter("x")
        cm.set_adapter("other")
        with cm.disable_adapter():
            cm(input_ids=ids)
        cm(input_ids=ids, adapter_names=["default", "other", "__base__"])
        cm.set_adapter("default")

    with torch.no_grad():
        cm(input_ids=ids)
        cm.train()
        cm(input_ids=ids)
        cm.eval()
        cycle()
        shape = [len(p.gm.graph.nodes) for p in cm.programs]
        live, held = _live_nodes(), len(sources())
        for _ in range(6):
            cycle()
    assert [len(p.gm.graph.nodes) for p in cm.programs] == shape
    assert len(sources()) <= held  # fx's copies of generated code: before the fix, dozens more a cycle
    assert len(cm.programs) == 2
    # before the fix, each cycle left ~1,270 erased nodes alive in the graphs' name tables
    assert _live_nodes() - live <= 0


def test_the_signature_cache_keeps_the_most_recently_used(monkeypatch):
    import peftc.program

    monkeypatch.setattr(peftc.program, "MAX_SIGNATURES", 2)
    cm, _ = two_adapter_llama()
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = cm(input_ids=ids).logits
        first = cm.program_for(input_ids=ids)
        hidden = cm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        cm(input_ids=ids)  # the plain signature is the most recent again
        cm(input_ids=ids, return_dict=False)  # a third signature: the hidden-states one goes
        assert len(cm.programs) == 2
        assert cm.program_for(input_ids=ids) is first  # kept, not traced again
        assert torch.equal(cm(input_ids=ids, output_hidden_states=True).hidden_states[-1], hidden)  # traced again
        assert torch.equal(cm(input_ids=ids).logits, plain)
    assert len(cm.programs) == 2
