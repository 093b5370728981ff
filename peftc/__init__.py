"""peftc: a torch.fx graph-rewriting compiler for parameter-efficient fine-tuning.

The public API, listed once::

    cm = peftc.compile(model, [peftc.LoRA(r=8).on(peftc.linear(r".*q_proj"))])
"""

from .adapters.base import Adapter
from .adapters.bitfit import BitFit
from .adapters.lora import LoRA
from .adapters.prefix import Prefix
from .adapters.prompt import Prompt
from .compile import compile
from .errors import MergeError, PeftcError, RuleError, TraceError
from .load import from_pretrained
from .match import Selector, attention, embedding, input_embeddings, linear, module, op, where
from .passes.insert import Builder, Placement
from .pattern import PatternSite, pattern
from .program import CompiledModel
from .rules import Rule, RuleSet, load_rules
from .sites import Site

__all__ = [
    "Adapter",
    "BitFit",
    "Builder",
    "CompiledModel",
    "LoRA",
    "MergeError",
    "PeftcError",
    "PatternSite",
    "Placement",
    "Prefix",
    "Prompt",
    "Rule",
    "RuleError",
    "RuleSet",
    "Selector",
    "Site",
    "TraceError",
    "attention",
    "compile",
    "embedding",
    "from_pretrained",
    "input_embeddings",
    "linear",
    "load_rules",
    "module",
    "op",
    "pattern",
    "where",
]
__version__ = "0.1.0"
