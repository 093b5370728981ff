"""PEFT's adapter configs <-> peftc rules, in both directions.

Reading (:func:`to_rules`): a ``LoraConfig``, ``IA3Config``, ``LoHaConfig``,
``LoKrConfig``, ``VeraConfig``, ``PromptTuningConfig``, ``PrefixTuningConfig``,
``PromptEncoderConfig`` or ``AdaptionPromptConfig`` as a dict (``adapter_config.json``),
with PEFT 0.21's semantics for ``target_modules`` (names, a regex, ``"all-linear"``, the
per-model defaults), ``exclude_modules``, ``layers_to_transform``,
``rank_pattern``/``alpha_pattern`` and task types; and peftc's native config
(``peft_type: "PEFTC"``), which holds any adapter kind site by site.

Writing (:func:`adapter_config`): the config dict that rebuilds a compiled
model's adapter: PEFT's own for LoRA (DoRA: ``use_dora``), IA³, LoHa, LoKr, VeRA,
prompt, prefix and P-tuning, and AdaptionPrompt; the native one for anything PEFT can't hold.

This is the one room of the house besides each kind's own file that knows
particular adapter kinds: it translates PEFT's vocabulary into theirs.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from typing import NamedTuple

from torch import nn

from . import default_targets, moe_targets
from .adapters.adaption_prompt import AdaptionPrompt
from .adapters.base import Rule, adapter_from_config
from .adapters.dora import DoRA
from .adapters.ia3 import IA3
from .adapters.loha import LoHa
from .adapters.lokr import LoKr
from .adapters.lora import LoRA
from .adapters.p_tuning import PTuning
from .adapters.prefix import Prefix
from .adapters.prompt import Prompt, encoder_decoder
from .adapters.vera import VeRA
from .errors import RuleError
from .match import Selector, attention, check_layers_pattern, compile_regex, experts, where
from .sites import EXPERTS, Site, layer_index

NATIVE = "PEFTC"  # peft_type of peftc's own format, for kinds PEFT can't hold


class Translated(NamedTuple):
    """What a config says: rules, and the module-level options (a RuleSet's fields)."""

    rules: list[Rule]
    modules_to_save: list[str]
    bias: str
    task_type: str | None


# -- reading --------------------------------------------------------------------------


# PEFT's IA3 defaults: targets, and which of them are feed-forward (scaled on their input).
_IA3_DEFAULTS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
}
SEQ_CLS_HEADS = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS, when the model has them
_IGNORED_WHEN_DEFAULT = {
    "lora_bias": False, "trainable_token_indices": None,
    "layer_replication": None, "megatron_config": None, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "alora_invocation_tokens": None, "arrow_config": None,
}


def to_rules(config: dict, model: nn.Module | None) -> Translated:
    """The rules and options of a PEFT config dict (or of peftc's native config).

    Raises:
        RuleError: an unknown ``peft_type``, or options peftc can't honour.
    """
    kind = peft_type(config)
    if kind not in _READERS:
        raise RuleError(f"peft_type {config.get('peft_type')!r} is not supported; supported: {sorted(_READERS)}")
    return _READERS[kind](config, model)


def supported_peft_types() -> tuple[str, ...]:
    """The ``peft_type`` values :func:`to_rules` reads."""
    return tuple(_READERS)


def peft_type(config: dict) -> str:
    """``config``'s ``peft_type``, normalised (``"PeftType.LORA"`` -> ``"LORA"``)."""
    return str(config.get("peft_type", "")).upper().rsplit(".", 1)[-1]


def _task_options(config: dict) -> tuple[list[str], str | None]:
    """modules_to_save (with PEFT's classifier heads for SEQ_CLS) and the task type."""
    modules_to_save = list(config.get("modules_to_save") or [])
    task_type = str(config["task_type"]).rsplit(".", 1)[-1].upper() if config.get("task_type") else None
    if task_type == "SEQ_CLS":
        modules_to_save += [m for m in SEQ_CLS_HEADS if m not in modules_to_save]
    return modules_to_save, task_type


def _check_submodules(config: dict, model, what: str) -> None:
    """A prompt-learning config's ``num_transformer_submodules`` must be the table peftc builds on ``model``."""
    submodules, want = config.get("num_transformer_submodules"), 2 if encoder_decoder(model) else 1
    if submodules is not None and model is not None and submodules != want:
        raise RuleError(f"num_transformer_submodules={submodules}: peftc's {what} of "
                        f"{type(model).__name__} has {want} (2 for encoder-decoder models, whose table holds "
                        "2 * num_virtual_tokens rows, as PEFT's SEQ_2_SEQ_LM; else 1)")


def _from_prompt(config: dict, model) -> Translated:
    init = str(config.get("prompt_tuning_init", "RANDOM")).rsplit(".", 1)[-1].upper()
    inits = {"RANDOM": "random", "TEXT": "text", "SAMPLE_VOCAB": "vocab"}
    if init not in inits:
        raise RuleError(f"prompt_tuning_init={init!r} is not supported; use one of {sorted(inits)}")
    tokenizer = None
    if init == "TEXT":
        from transformers import AutoTokenizer

        path = config.get("tokenizer_name_or_path")
        kwargs = _tokenizer_kwargs(config.get("tokenizer_kwargs"))
        try:
            # trust_remote_code=False, not the default None: None asks on a terminal whether to run
            # the folder's code (and waits for an answer); False refuses it outright
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, trust_remote_code=False)
        except Exception as e:
            raise RuleError(f"can't load the tokenizer {path!r} for TEXT init (no model hub here: "
                            f"give a local path, or build peftc.Prompt(init='text', tokenizer=...)): {e}") from e
    _check_submodules(config, model, "prompt tuning")
    adapter = Prompt(config.get("num_virtual_tokens") or 0, inits[init],
                     config.get("prompt_tuning_init_text"), tokenizer)
    modules_to_save, task_type = _task_options(config)
    return Translated([adapter.on(adapter.default_selector())], modules_to_save, "none", task_type)


# What a config may pass to AutoTokenizer.from_pretrained: nothing that can run code
# (trust_remote_code, code_revision) or redirect loading.
_TOKENIZER_KWARGS = ("revision", "use_fast", "subfolder")


def _tokenizer_kwargs(kwargs) -> dict:
    """A config's ``tokenizer_kwargs`` cut to :data:`_TOKENIZER_KWARGS`, warning about the rest."""
    if not kwargs:
        return {}
    if not isinstance(kwargs, dict):
        raise RuleError(f"tokenizer_kwargs={kwargs!r} must be a dict of keyword arguments")
    dropped = sorted(k for k in kwargs if k not in _TOKENIZER_KWARGS)
    if dropped:
        warnings.warn(
            f"ignoring tokenizer_kwargs {dropped} from the adapter config: a config can't choose how a "
            f"tokenizer is loaded (trust_remote_code=True would run code from the tokenizer's folder); "
            f"peftc passes only {list(_TOKENIZER_KWARGS)}. To load a tokenizer your way, build it "
            "yourself and pass peftc.Prompt(init='text', text=..., tokenizer=tok)",
            UserWarning, stacklevel=4)
    return {k: v for k, v in kwargs.items() if k in _TOKENIZER_KWARGS}


def _from_prefix(config: dict, model) -> Translated:
    projection = config.get("encoder_hidden_size") if config.get("prefix_projection") else None
    adapter = Prefix(config.get("num_virtual_tokens") or 0, projection)
    modules_to_save, task_type = _task_options(config)
    return Translated([adapter.on(adapter.default_selector())], modules_to_save, "none", task_type)


def _from_p_tuning(config: dict, model) -> Translated:
    """PEFT's ``PromptEncoderConfig``; ``inference_mode`` (a loaded adapter) builds no encoder, as in PEFT."""
    encoder = str(config.get("encoder_reparameterization_type") or "MLP").rsplit(".", 1)[-1].lower()
    num_layers, dropout = config.get("encoder_num_layers", 2), config.get("encoder_dropout") or 0.0
    if encoder == "mlp" and (num_layers != 2 or dropout):  # PEFT ignores both for its MLP
        warnings.warn(f"PromptEncoderConfig: encoder_num_layers={num_layers} and encoder_dropout={dropout} apply "
                      "to the LSTM encoder only; the MLP encoder has two hidden layers and no dropout (as in PEFT)",
                      UserWarning, stacklevel=4)
        num_layers, dropout = 2, 0.0
    _check_submodules(config, model, "P-tuning")
    adapter = PTuning(config.get("num_virtual_tokens") or 0, config.get("encoder_hidden_size"), encoder,
                      num_layers, dropout, folded=bool(config.get("inference_mode")))
    modules_to_save, task_type = _task_options(config)
    return Translated([adapter.on(adapter.default_selector())], modules_to_save, "none", task_type)


_ADAPTION_TARGETS = {"llama": "self_attn", "mistral": "self_attn"}  # PEFT's defaults (GPT-2's fused c_attn: refused)


def _from_adaption_prompt(config: dict, model) -> Translated:
    """PEFT's ``AdaptionPromptConfig``: the attention ops of the top ``adapter_layers`` modules whose
    name ends with ``target_modules`` (PEFT's default by model type; any attention op where it has none)."""
    length, layers = config.get("adapter_len"), config.get("adapter_layers")
    if not length or not layers:
        raise RuleError(f"AdaptionPromptConfig needs adapter_len and adapter_layers (got {length!r}, {layers!r})")
    target = config.get("target_modules") or _ADAPTION_TARGETS.get(default_targets.model_type(model))
    if target is not None and not isinstance(target, str):
        raise RuleError(f"AdaptionPromptConfig target_modules={target!r} must be one module name, e.g. 'self_attn'")
    adapter = AdaptionPrompt(length, layers)
    selector = attention(rf"(.*\.)?{re.escape(target)}" if target else None, top=layers)
    modules_to_save, task_type = _task_options(config)
    return Translated([adapter.on(selector)], modules_to_save, "none", task_type)


def _from_lora(config: dict, model: nn.Module | None) -> Translated:
    unsupported = [
        k for k, default in _IGNORED_WHEN_DEFAULT.items()
        if config.get(k, default) not in (default, None, {}, [], False)
    ]
    if unsupported:
        raise RuleError(f"LoraConfig options {unsupported} are not supported by peftc; remove them")
    init = config.get("init_lora_weights", True)
    kind = DoRA if config.get("use_dora") else LoRA
    if init not in (True, False, "gaussian", "pissa", "olora") and not re.fullmatch(r"pissa_niter_\d+", str(init)):
        raise RuleError(f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
                        "'pissa_niter_<K>' or 'olora'")
    modules_to_save, task_type = _task_options(config)
    targets, within, parameters = config.get("target_modules"), None, set(config.get("target_parameters") or ())
    listed, widened = False, {}
    if targets is None:
        if parameters:  # PEFT: parameters alone, or with the default (none on renamed MoE models)
            targets = [] if moe_targets.family(model) else default_targets.lora_targets(model) or []
        else:
            targets = default_targets.lora_targets(model)
            if targets is None:
                within = _attention_fallback(model)
    else:
        all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
        names = _all_linear(model, config.get("task_type")) if all_linear else None
        listed = not isinstance(targets, str)  # names the user wrote: each must find a site
        targets, renamed, widened = moe_targets.translate(model, targets, names)
        parameters |= renamed
    if parameters:
        if config.get("lora_dropout"):
            raise RuleError(f"PEFT adapts {sorted(parameters)} of this model as parameters, which it refuses with "
                            "lora_dropout != 0 (dropout can't be factored out of a weight); set lora_dropout=0")
    selector = _PeftTargets(
        targets, config.get("exclude_modules"), config.get("layers_to_transform"),
        config.get("layers_pattern"), modules_to_save, within, parameters, listed,
    )
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    adapter = kind(
        r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
        init=init, use_rslora=config.get("use_rslora", False),
        rank_pattern={**(config.get("rank_pattern") or {}), **{k: r * n for k, n in widened.items()}},
        alpha_pattern={**(config.get("alpha_pattern") or {}), **{k: alpha * n for k, n in widened.items()}},
    )
    return Translated([Rule(selector, adapter)], modules_to_save, config.get("bias", "none"), task_type)


def _attention_fallback(model: nn.Module | None) -> list[str]:
    """The attention blocks whose linear ops a LoraConfig without target_modules adapts
    when PEFT has no default for the model type (PEFT itself refuses the config)."""
    model_type = default_targets.model_type(model)
    blocks = default_targets.attention_blocks(model) if model is not None else {}
    if not blocks:
        raise RuleError(f"LoraConfig has no target_modules, PEFT has no default for model type {model_type!r} "
                        "and the model has no attention blocks (modules named *Attention*) to fall back on; "
                        "set target_modules")
    classes = ", ".join(sorted(set(blocks.values())))
    warnings.warn(
        f"LoraConfig has no target_modules and PEFT 0.21 has no default for model type {model_type!r} "
        f"(PEFT refuses this config); peftc adapts every linear op inside the model's {len(blocks)} "
        f"attention blocks ({classes}). Set target_modules to choose the modules yourself",
        UserWarning, stacklevel=5)
    return list(blocks)


def _from_ia3(config: dict, model: nn.Module | None) -> Translated:
    """Two rules: output scaling on the targets, input scaling on the feed-forward ones."""
    init = config.get("init_ia3_weights", True)
    if not isinstance(init, bool):
        raise RuleError(f"init_ia3_weights={init!r} must be True or False")
    modules_to_save, task_type = _task_options(config)
    targets, feedforward = config.get("target_modules"), config.get("feedforward_modules")
    if targets is None:
        targets = _default_for(model, {k: t for k, (t, _) in _IA3_DEFAULTS.items()}, "IA3Config", "target_modules")
    if feedforward is None:
        feedforward = _default_for(model, {k: f for k, (_, f) in _IA3_DEFAULTS.items()}, "IA3Config",
                                   "feedforward_modules")
    if not isinstance(targets, str) and not isinstance(feedforward, str) and not set(feedforward) <= set(targets):
        raise RuleError(f"IA3Config feedforward_modules {sorted(set(feedforward) - set(targets))} are not in "
                        "target_modules; every feed-forward module must also be a target")
    selector = _target_selector(config, model, targets, modules_to_save)
    if isinstance(feedforward, str):
        pattern = compile_regex(feedforward, "feedforward_modules")
        is_ff = where(lambda s: pattern.fullmatch(s.path) is not None, f"feedforward({feedforward!r})")
    else:  # PEFT's test: a plain suffix, no dot required
        names = tuple(feedforward)
        is_ff = where(lambda s: s.path.endswith(names), f"feedforward({sorted(names)!r})")
    rules = [Rule(selector & ~is_ff, IA3(feedforward=False, init=init)),
             Rule(selector & is_ff, IA3(feedforward=True, init=init))]
    return Translated(rules, modules_to_save, "none", task_type)


def _from_kind(kind: type, config_name: str):
    """The reader of a config whose kind takes its options from ``kind.from_peft`` and its
    targets as LoRA's do (LoHa, LoKr, VeRA): listed, a regex, ``"all-linear"`` or PEFT's default."""

    def read(config: dict, model: nn.Module | None) -> Translated:
        adapter = kind.from_peft(config)
        modules_to_save, task_type = _task_options(config)
        targets = config.get("target_modules")
        if targets is None:
            targets = default_targets.targets_for(peft_type(config), model)
            if targets is None:
                raise RuleError(f"{config_name} has no target_modules and PEFT has no default for model type "
                                f"{default_targets.model_type(model)!r}; set target_modules")
        bias = {"vera_only": "lora_only"}.get(config.get("bias", "none"), config.get("bias", "none"))
        return Translated([Rule(_target_selector(config, model, targets, modules_to_save), adapter)],
                          modules_to_save, bias, task_type)

    return read


def _default_for(model: nn.Module | None, table: dict, config_name: str, option: str):
    """PEFT's per-model-type default for ``option``, or a RuleError asking for it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise RuleError(f"{config_name} has no {option} and peftc has no default for model type "
                        f"{model_type!r}; set {option}")
    return table[model_type]


def _target_selector(config: dict, model: nn.Module | None, targets, modules_to_save) -> _PeftTargets:
    """PEFT's module matching for ``targets`` with the config's exclusions and layer filters."""
    listed = not isinstance(targets, str)  # names the user wrote: each must find a site
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, config.get("task_type"))
    return _PeftTargets(targets, config.get("exclude_modules"), config.get("layers_to_transform"),
                        config.get("layers_pattern"), modules_to_save, listed=listed)


def _all_linear(model: nn.Module | None, task_type) -> set[str]:
    """PEFT's "all-linear": every nn.Linear / Conv1D except the output head."""
    if model is None:
        raise RuleError('target_modules="all-linear" needs the model; pass rules through peftc.compile')
    from transformers.pytorch_utils import Conv1D

    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and str(task_type or "").upper().endswith("SEQ_CLS"):
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
    if head is not None:
        names -= {n for n, m in model.named_modules() if m is head}
    return names


class _PeftTargets(Selector):
    """PEFT's module matching: target/exclude lists or regexes, layer filters."""

    def __init__(self, targets, exclude, layers, layers_pattern, modules_to_save, within=None, parameters=(),
                 listed=False):
        # targets=None with ``within``: every linear op inside those modules (the attention fallback);
        # ``parameters``: PEFT's target_parameters, weights matched by name (a MoE router's or a
        # stack of experts', see moe_targets)
        # every regex is compiled here, so a bad one is a RuleError naming its option before
        # the model is touched (not a raw re.error from the middle of matching)
        self.targets, self.exclude = targets, exclude
        self.layers = [layers] if isinstance(layers, int) else layers
        self.layers_pattern, self.modules_to_save = layers_pattern, modules_to_save
        self.within, self.parameters, self.listed = within, set(parameters), listed
        self._targets = compile_regex(targets, "target_modules") if isinstance(targets, str) else None
        self._exclude = compile_regex(exclude, "exclude_modules") if isinstance(exclude, str) else None
        self._saved = [compile_regex(m, "modules_to_save", r"(^|.*\.){}($|\..*)") for m in modules_to_save]
        check_layers_pattern(layers_pattern)

    def __call__(self, site: Site) -> bool:
        # Every kind of site a name reaches is selected, so LoRA adapts it or the rule raises
        # (LoRA can't adapt it): a named target is never dropped. Only the attention fallback
        # and parameter targets stay on linear ops.
        if self.parameters and _by_parameter(site) and moe_targets.matches_parameter(site.weight_path, self.parameters):
            return True
        if self.within is not None and not site.is_linear:
            return False
        key = site.path
        # a bare parameter's site (``x @ self.W``) is saved under its weight path (Site.key):
        # a name matches the module path or that
        names = {key, site.key}
        if self._exclude is not None:
            if any(self._exclude.fullmatch(k) for k in names):
                return False
        elif self.exclude and _names_match(self.exclude, names):
            return False
        if any(m.match(key) for m in self._saved):
            return False
        if self._targets is not None:
            return any(self._targets.fullmatch(k) is not None for k in names)
        if self.within is not None:
            if not any(key.startswith(f"{block}.") for block in self.within):
                return False
        elif any(k in self.targets for k in names):
            return True
        elif not _names_match(self.targets, names):
            return False
        if self.layers:
            return layer_index(key, self.layers_pattern) in self.layers
        return True

    def check_sites(self, sites: list[Site]) -> None:
        """Raise unless every listed target name and every parameter target reaches a site."""
        paths = {s.path for s in sites} | {s.key for s in sites}
        missing = [t for t in (self.targets if self.listed else ()) if not _names_match([t], paths)]
        missing += [p for p in sorted(self.parameters) if not any(
            _by_parameter(s) and moe_targets.matches_parameter(s.weight_path, {p}) for s in sites)]
        if missing:
            raise RuleError(f"target_modules / target_parameters {missing} match no op of the model "
                            "(no module path ends with such a name, or the weight is not read by a linear op "
                            "or a batched matmul over experts); "
                            "remove them or fix their spelling")

    def describe(self):
        if self.within is not None:
            return f"peft_attention_blocks({len(self.within)} blocks)"
        return f"peft_target_modules({self.targets!r})"

    def hint(self):
        if self.within is not None:
            return next(iter(self.within), None)
        return self.targets if isinstance(self.targets, str) else next(iter(self.targets), None)


def _by_parameter(site: Site) -> bool:
    """Whether PEFT's ``target_parameters`` can name ``site``: a linear op's weight or a stack of experts."""
    return site.is_linear or site.kind == EXPERTS


def _names_match(names, key) -> bool:
    """Whether ``key`` (a module path, or a set of them) is one of ``names`` or ends with ``.<name>``."""
    keys = [key] if isinstance(key, str) else key
    return any(k in names or any(k.endswith(f".{n}") for n in names) for k in keys)


# -- writing --------------------------------------------------------------------------


def adapter_config(cm, name: str) -> dict:
    """The config dict for adapter ``name``: PEFT's for LoRA, IA³, prompt or prefix tuning,
    peftc's own (``peft_type: "PEFTC"``) for anything PEFT can't hold."""
    placements = [p for p in cm.sites if p.adapter_name == name]
    kinds = {type(p.adapter) for p in placements}
    if kinds == {Prompt} or kinds == {Prefix} or kinds == {PTuning}:
        return _prompt_learning_config(cm, name, kinds.pop())
    # PEFT adapts a stack of experts whole: some of its experts only is peftc's own
    whole = all(p.site.expert_ids is None for p in placements)
    if whole and kinds in ({LoRA}, {DoRA}) and len({(p.adapter.use_rslora, p.adapter.changes_base and p.adapter.init)
                                                    for p in placements}) == 1:
        return _lora_config(cm, name)
    if kinds == {IA3}:
        return _ia3_config(cm, name, placements)
    if kinds == {AdaptionPrompt} and (config := _adaption_prompt_config(cm, name, placements)):
        return config
    if kinds in ({LoHa}, {LoKr}, {VeRA}) and _one_peft_spec(placements):
        return _kind_config(cm, name, placements)
    return _native_config(cm, name)


def is_prompt_learning(placements) -> bool:
    """Whether PEFT files these placements as prompt learning (prompt, prefix or P-tuning),
    which keys ``modules_to_save`` copies one level up."""
    return any(isinstance(p.adapter, (Prompt, Prefix)) for p in placements)


def _native_config(cm, name: str) -> dict:
    """peftc's config: every site with its adapter's arguments (``Adapter.config()``).

    Tensors use the same keys as PEFT's format (``base_model.model.<key>.<state>``).
    Sites found by a pattern can't be found again from a name alone: loading
    such an adapter needs its rules (``from_pretrained(..., rules=...)``).
    """
    options = cm.adapter_options(name)
    return {
        "peft_type": NATIVE,
        "format_version": 1,
        "task_type": options.get("task_type") or _task_type(cm.base_model),
        "bias": options.get("bias", "none"),
        "modules_to_save": options.get("modules_to_save") or None,
        "sites": [{"weight_path": p.site.weight_path, "kind": p.site.kind, "op": p.site.op,
                   "adapter": p.adapter.config(),
                   **({"experts": list(p.site.expert_ids)} if p.site.expert_ids is not None else {})}
                  for p in cm.sites if p.adapter_name == name],
    }


def _from_native(config: dict, model) -> Translated:
    """Rules rebuilding a native config's adapter on the same sites (by weight path)."""
    if not isinstance(config.get("sites"), list):
        raise RuleError("a PEFTC adapter config needs a list of 'sites'; the file is not one peftc wrote")
    if any(site["kind"] == "pattern" for site in config["sites"]):
        raise RuleError("this adapter sits on pattern-matched sites; pass the rules it was built "
                         "with: from_pretrained(model, dir, rules=[...])")
    groups: dict[tuple[str, str], list[str]] = {}
    for site in config["sites"]:  # sites with the same adapter and (on stacks of experts) the same experts
        key = (json.dumps(site["adapter"], sort_keys=True), json.dumps(site.get("experts")))
        groups.setdefault(key, []).append(site["weight_path"])
    rules = []
    for (spec, picked), paths in groups.items():
        try:
            adapter = adapter_from_config(json.loads(spec))
        except RuleError as e:
            raise RuleError(f"{e}. A custom kind must be imported before loading an adapter that uses it") from e
        wanted = frozenset(paths)
        selector = where(lambda s, w=wanted: s.weight_path in w, f"saved_sites({len(wanted)})")
        if json.loads(picked) is not None:
            selector = selector & experts(indices=json.loads(picked))
        rules.append(Rule(selector, adapter))
    return Translated(rules, list(config.get("modules_to_save") or []), config.get("bias", "none"),
                      config.get("task_type"))


def _prompt_learning_config(cm, name: str, kind: type) -> dict:
    placement = next(p for p in cm.sites if p.adapter_name == name)
    spec, config = placement.adapter, getattr(cm.base_model, "config", None)
    out = {
        "peft_type": {Prompt: "PROMPT_TUNING", Prefix: "PREFIX_TUNING", PTuning: "P_TUNING"}[kind],
        "task_type": cm.adapter_options(name).get("task_type") or _task_type(cm.base_model),
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "inference_mode": True,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "num_transformer_submodules": 2 if encoder_decoder(cm.base_model) else 1,
        "modules_to_save": cm.adapter_options(name).get("modules_to_save") or None,
    }
    if kind is PTuning:
        token_dim = placement.state.embedding.shape[1]
        out.update(encoder_reparameterization_type=spec.encoder.upper(), encoder_hidden_size=spec.hidden_size or
                   token_dim, encoder_num_layers=spec.num_layers, encoder_dropout=spec.dropout, token_dim=token_dim)
    elif kind is Prompt:
        out.update(prompt_tuning_init={"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}[spec.init],
                   prompt_tuning_init_text=spec.text, tokenizer_name_or_path=None,
                   token_dim=placement.state.embedding.shape[1])
    else:
        n, rows, kv_heads, head_dim = placement.state.shape
        out.update(prefix_projection=False, encoder_hidden_size=spec.projection or kv_heads * head_dim,
                   num_layers=rows // 2, token_dim=kv_heads * head_dim, num_attention_heads=kv_heads)
    return out


def _lora_config(cm, name: str) -> dict:
    """A PEFT ``LoraConfig`` dict that rebuilds adapter ``name`` on the same sites."""
    placements = [p for p in cm.sites if p.adapter_name == name]
    ranks = Counter(p.state.r for p in placements)
    r = ranks.most_common(1)[0][0] if ranks else 8
    use_rslora = {p.adapter.use_rslora for p in placements} == {True}
    alphas = {p.key: _alpha(p, use_rslora) for p in placements}
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8
    dropouts = {p.adapter.dropout for p in placements}
    if len(dropouts) > 1:
        warnings.warn(f"adapter {name!r} has several dropouts {sorted(dropouts)}; PEFT keeps one: "
                      f"{max(dropouts)}", stacklevel=3)
    options = cm.adapter_options(name)
    stacks = {p.key: p.site.weight_path for p in placements if p.site.kind == EXPERTS}
    return {
        **_header(cm, name, "LORA"),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts, default=0.0),
        "target_modules": sorted(set(alphas) - set(stacks)),
        "target_parameters": sorted(stacks.values()) or None,
        "rank_pattern": {re.escape(k): p.state.r for p in placements
                         if p.state.r != r and (k := p.key)},
        "alpha_pattern": {re.escape(k): a for k, a in alphas.items() if a != alpha},
        "use_rslora": use_rslora,
        "fan_in_fan_out": any(p.site.layout == "in_out" for p in placements),
        # PiSSA/OLoRA stay: PEFT (and peftc) loading onto the original base redo its residual
        "init_lora_weights": placements[0].adapter.init if placements[0].adapter.changes_base else True,
        "bias": options.get("bias", "none"),
        "modules_to_save": options.get("modules_to_save") or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "use_dora": isinstance(placements[0].adapter, DoRA),
        "lora_bias": False,
    }


def _header(cm, name: str, peft_type: str) -> dict:
    """The fields every PEFT config dict written here starts with."""
    return {
        "peft_type": peft_type,
        "task_type": cm.adapter_options(name).get("task_type") or _task_type(cm.base_model),
        "base_model_name_or_path": getattr(getattr(cm.base_model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
    }


def _ia3_config(cm, name: str, placements) -> dict:
    """A PEFT ``IA3Config`` dict that rebuilds adapter ``name`` on the same sites."""
    options = cm.adapter_options(name)
    return {
        **_header(cm, name, "IA3"),
        "target_modules": sorted(p.key for p in placements),
        "feedforward_modules": sorted(p.key for p in placements if p.adapter.feedforward),
        "exclude_modules": None,
        "fan_in_fan_out": any(p.site.layout == "in_out" for p in placements),
        "init_ia3_weights": True,
        "modules_to_save": options.get("modules_to_save") or None,
    }


def _one_peft_spec(placements) -> bool:
    """Whether PEFT's config can hold these LoHa, LoKr or VeRA placements: one spec (up to
    ranks and alphas), and for LoHa and LoKr ``[out, in]`` weights only (PEFT refuses them
    on GPT-2's Conv1D; VeRA takes it, with ``fan_in_fan_out``)."""
    specs = {json.dumps(p.adapter.peft_fields(), sort_keys=True) for p in placements}
    return len(specs) == 1 and all(p.site.layout == "out_in" or isinstance(p.adapter, VeRA) for p in placements)


def _kind_config(cm, name: str, placements) -> dict:
    """A PEFT ``LoHaConfig``, ``LoKrConfig`` or ``VeraConfig`` dict that rebuilds adapter ``name``."""
    spec, options = placements[0].adapter, cm.adapter_options(name)
    out = {
        **_header(cm, name, {LoHa: "LOHA", LoKr: "LOKR", VeRA: "VERA"}[type(spec)]),
        "target_modules": sorted(p.key for p in placements),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": options.get("modules_to_save") or None,
        **spec.peft_fields(),
    }
    if isinstance(spec, VeRA):
        del out["exclude_modules"]  # VeraConfig has none
        bias = options.get("bias", "none")
        out.update(fan_in_fan_out=any(p.site.layout == "in_out" for p in placements),
                   bias={"lora_only": "vera_only"}.get(bias, bias))
        return out
    ranks = {p.key: p.adapter.rank_and_alpha(p.site) for p in placements}
    r = Counter(r for r, _ in ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranks.values()).most_common(1)[0][0]
    out.update(r=r, alpha=alpha, rank_pattern={re.escape(k): v for k, (v, _) in ranks.items() if v != r},
               alpha_pattern={re.escape(k): v for k, (_, v) in ranks.items() if v != alpha})
    return out


def _adaption_prompt_config(cm, name: str, placements) -> dict | None:
    """A PEFT ``AdaptionPromptConfig`` dict, or None when PEFT's rule (the top modules of one
    name) can't find the same attention modules."""
    lengths = {p.adapter.adapter_len for p in placements}
    target = placements[0].key.rpartition(".")[2]
    named = [path for path, _ in cm.base_model.named_modules() if path.endswith(f".{target}")]
    if len(lengths) != 1 or sorted(p.key for p in placements) != sorted(named[len(named) - len(placements):]):
        return None
    return {
        **_header(cm, name, "ADAPTION_PROMPT"),
        "target_modules": target,
        "adapter_len": lengths.pop(),
        "adapter_layers": len(placements),
    }


def _alpha(p, use_rslora: bool) -> float:
    scaling = float(p.state.scaling)
    alpha = scaling * (p.state.r ** 0.5 if use_rslora else p.state.r)
    return int(round(alpha)) if abs(alpha - round(alpha)) < 1e-6 else alpha


def _task_type(model) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


_READERS = {"LORA": _from_lora, "IA3": _from_ia3, "LOHA": _from_kind(LoHa, "LoHaConfig"),
            "LOKR": _from_kind(LoKr, "LoKrConfig"), "VERA": _from_kind(VeRA, "VeraConfig"),
            "PROMPT_TUNING": _from_prompt, "PREFIX_TUNING": _from_prefix, "P_TUNING": _from_p_tuning,
            "ADAPTION_PROMPT": _from_adaption_prompt, NATIVE: _from_native}
