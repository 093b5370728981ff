"""``peftc.testing``: a kit to property-test adapter kinds in your own test suite.

::

    from hypothesis import given, settings, strategies as st
    from peftc.testing import assert_merge_equivalent, strategies as pst

    @settings(max_examples=20, deadline=None)
    @given(case=pst.cases(adapters=st.builds(MyAdapter)))
    def test_my_adapter_merges(case):
        assert_merge_equivalent(*case)

- :mod:`peftc.testing.assertions`: ``assert_merge_equivalent``,
  ``assert_unmerge_restores``, ``assert_roundtrip``;
- :mod:`peftc.testing.memory`: ``held_bytes``, what backward keeps (for checkpointing);
- :mod:`peftc.testing.strategies` (needs ``hypothesis``): random models, rules
  for a model, inputs for a model, and ``cases`` bundling the three.
"""

from __future__ import annotations

import importlib

from .assertions import (
    TOLERANCES,
    assert_merge_equivalent,
    assert_roundtrip,
    assert_unmerge_restores,
)
from .memory import held_bytes

__all__ = [
    "TOLERANCES",
    "assert_merge_equivalent",
    "assert_roundtrip",
    "assert_unmerge_restores",
    "held_bytes",
    "strategies",
]


def __getattr__(name: str):
    # hypothesis is a test dependency: import the strategies only when asked for
    if name == "strategies":
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
