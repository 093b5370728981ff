"""peftc: a torch.fx graph-rewriting compiler for parameter-efficient fine-tuning.

The public API, listed once::

    cm = peftc.compile(model, [peftc.LoRA(r=8).on(peftc.linear(r".*q_proj"))])
"""

from . import distributed as distributed
from .adapters.adaption_prompt import AdaptionPrompt as AdaptionPrompt
from .adapters.base import Adapter as Adapter
from .adapters.bitfit import BitFit as BitFit
from .adapters.dora import DoRA as DoRA
from .adapters.ia3 import IA3 as IA3
from .adapters.loha import LoHa as LoHa
from .adapters.lokr import LoKr as LoKr
from .adapters.lora import LoRA as LoRA
from .adapters.p_tuning import PTuning as PTuning
from .adapters.prefix import Prefix as Prefix
from .adapters.prompt import Prompt as Prompt
from .adapters.vera import VeRA as VeRA
from .api import AutoPeftModel as AutoPeftModel
from .api import AutoPeftModelForCausalLM as AutoPeftModelForCausalLM
from .api import AutoPeftModelForFeatureExtraction as AutoPeftModelForFeatureExtraction
from .api import AutoPeftModelForQuestionAnswering as AutoPeftModelForQuestionAnswering
from .api import AutoPeftModelForSeq2SeqLM as AutoPeftModelForSeq2SeqLM
from .api import AutoPeftModelForSequenceClassification as AutoPeftModelForSequenceClassification
from .api import AutoPeftModelForTokenClassification as AutoPeftModelForTokenClassification
from .api import compile as compile
from .api import from_pretrained as from_pretrained
from .api import get_peft_model as get_peft_model
from .api import hotswap_adapter as hotswap_adapter
from .compiled import CompiledModel as CompiledModel
from .compiled import PeftModel as PeftModel
from .errors import CapacityError as CapacityError
from .errors import MergeError as MergeError
from .errors import PeftcError as PeftcError
from .errors import QuantizationError as QuantizationError
from .errors import RuleError as RuleError
from .errors import TraceError as TraceError
from .match import Selector as Selector
from .match import attention as attention
from .match import convolution as convolution
from .match import embedding as embedding
from .match import experts as experts
from .match import input_embeddings as input_embeddings
from .match import linear as linear
from .match import module as module
from .match import op as op
from .match import where as where
from .optimize import Optimize as Optimize
from .passes.builder import Builder as Builder
from .pattern import PatternSite as PatternSite
from .pattern import pattern as pattern
from .quantization import Quantize as Quantize
from .quantization import prepare_model_for_kbit_training as prepare_model_for_kbit_training
from .rules import Rule as Rule
from .rules import RuleSet as RuleSet
from .rules import load_rules as load_rules
from .sites import Site as Site
from .state import Placement as Placement
from .state import Reserve as Reserve

__version__ = "0.1.0"


def __getattr__(name: str):
    # peftc.Trainer and peftc.SFTTrainer import transformers' Trainer (seconds) and TRL: only when asked for.
    if name == "Trainer":
        from .integrations.trainer import Trainer

        return Trainer
    if name == "SFTTrainer":
        from .integrations.trl import SFTTrainer

        return SFTTrainer
    raise AttributeError(f"module 'peftc' has no attribute {name!r}")
