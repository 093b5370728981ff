"""Rules: which adapter goes on which sites, from Python, files, or a PEFT config.

A rule is data, ``Rule(selector, adapter)``; ``adapter.on(selector)`` builds one.
The same rules can be written as a dict (or a JSON / YAML / TOML file)::

    {"rules": [{"adapter": {"kind": "lora", "r": 16, "alpha": 32},
                "select": {"linear": ".*\\\\.(q|v)_proj", "layers": [0, 1]}}],
     "modules_to_save": ["classifier"]}

``select`` is ``{"linear" | "module": regex or null, "layers": [...],
"layers_pattern": name}``, ``{"op": [names]}``, or ``{"any" | "all": [selects]}``
and ``{"not": select}`` for composition. A PEFT ``adapter_config.json`` (or a
``LoraConfig``) is accepted anywhere rules are.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import match
from .adapters.base import Adapter, adapter_from_config
from .adapters.lora import LoRA
from .adapters.prefix import Prefix
from .adapters.prompt import Prompt
from .errors import RuleError
from .sites import Site, layer_index


@dataclass(frozen=True)
class Rule:
    """Put ``adapter`` on every site that ``selector`` picks."""

    selector: match.Selector
    adapter: Adapter

    def __post_init__(self):
        if not isinstance(self.selector, match.Selector):
            raise RuleError(f"Rule selector must be a peftc selector, got {self.selector!r}")
        if not isinstance(self.adapter, Adapter):
            raise RuleError(f"Rule adapter must be a peftc adapter, got {self.adapter!r}")

    def __str__(self):
        return f"{self.adapter!r}.on({self.selector.describe()})"


@dataclass
class RuleSet:
    """Rules plus the module-level options PEFT configs carry.

    Attributes:
        rules: the adapter rules.
        modules_to_save: module-name suffixes whose parameters train in full
            (a trainable copy; the original stays frozen), as PEFT's option.
        bias: PEFT's ``bias``: ``"none"``, ``"all"`` (every bias trains) or
            ``"lora_only"`` (biases of adapted ops train).
        task_type: PEFT's task type, when the rules came from a PEFT config.
    """

    rules: list[Rule]
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    task_type: str | None = None

    def __post_init__(self):
        if self.bias not in ("none", "all", "lora_only"):
            raise RuleError(f"bias={self.bias!r} must be 'none', 'all' or 'lora_only'")


def load_rules(source: Any, model: nn.Module | None = None) -> RuleSet:
    """Rules from a Rule, a list of Rules, a dict, a rules file, or a PEFT config.

    Arguments:
        source: any of the forms above; a ``str`` or ``Path`` names a file
            (``.json``, ``.yaml``/``.yml``, ``.toml``), or a directory holding
            ``adapter_config.json``.
        model: the model, needed for PEFT's ``"all-linear"`` and task types.
    """
    if isinstance(source, RuleSet):
        return source
    if isinstance(source, (Rule, Adapter)):
        return load_rules([source], model)
    if isinstance(source, (str, Path)):
        return load_rules(_read_file(Path(source)), model)
    if hasattr(source, "peft_type") and hasattr(source, "to_dict"):
        return _from_peft(source.to_dict(), model)
    if isinstance(source, dict):
        if "peft_type" in source:
            return _from_peft(source, model)
        return _from_dict(source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise RuleError("no rules given: pass at least one rule, e.g. peftc.LoRA(r=8).on(peftc.linear())")
        return RuleSet([_as_rule(r) for r in source])
    raise RuleError(f"can't read rules from {type(source).__name__}: pass Rules, a dict, a file path or a PEFT config")


def _as_rule(item) -> Rule:
    """A Rule, or an adapter with a default selector (``peftc.Prompt(20)``) made into one."""
    if isinstance(item, Rule):
        return item
    if isinstance(item, Adapter) and item.default_selector() is not None:
        return item.on(item.default_selector())
    raise RuleError(f"expected a Rule (adapter.on(selector)), got {item!r}")


def _read_file(path: Path) -> dict:
    if path.is_dir():
        path = path / "adapter_config.json"
    if not path.is_file():
        raise RuleError(f"rules file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
    except Exception as e:
        raise RuleError(f"rules file {path} is not valid {path.suffix[1:].upper()}: {e}") from e
    raise RuleError(f"rules file {path}: unknown format {path.suffix!r}; use .json, .yaml or .toml")


def _from_dict(data: dict) -> RuleSet:
    unknown = set(data) - {"rules", "modules_to_save", "bias"}
    if unknown or "rules" not in data:
        raise RuleError(
            f"a rules dict has keys 'rules' (required), 'modules_to_save', 'bias'; got {sorted(data)}"
        )
    rules = []
    for i, item in enumerate(data["rules"]):
        if not isinstance(item, dict) or set(item) != {"adapter", "select"}:
            raise RuleError(f"rule {i}: expected {{'adapter': {{...}}, 'select': {{...}}}}, got {item!r}")
        rules.append(Rule(_selector_from_dict(item["select"]), adapter_from_config(item["adapter"])))
    return RuleSet(rules, list(data.get("modules_to_save") or []), data.get("bias", "none"))


def _selector_from_dict(data: dict) -> match.Selector:
    if not isinstance(data, dict):
        raise RuleError(f"a selector is a dict, got {data!r}")
    if "any" in data or "all" in data:
        key = "any" if "any" in data else "all"
        if not isinstance(data[key], list) or not data[key]:
            raise RuleError(f"selector {{'{key}': [...]}} needs a non-empty list of selectors, got {data[key]!r}")
        parts = [_selector_from_dict(d) for d in data[key]]
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if key == "any" else (out & p)
        return out
    if "not" in data:
        return ~_selector_from_dict(data["not"])
    if "op" in data:
        names = data["op"]
        return match.op(*([names] if isinstance(names, str) else names))
    for kind in ("linear", "module"):
        if kind in data:
            extra = set(data) - {kind, "layers", "layers_pattern"}
            if extra:
                raise RuleError(f"unknown selector keys {sorted(extra)} in {data!r}")
            return getattr(match, kind)(data[kind], data.get("layers"), data.get("layers_pattern"))
    raise RuleError(f"unknown selector {data!r}: use linear, module, op, any, all or not")


# PEFT's defaults when a LoraConfig names no target_modules (facts from its model table).
_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "opt": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
}
_SEQ_CLS_HEADS = ["classifier", "score"]
_LORA_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_rslora", "fan_in_fan_out", "init_lora_weights", "bias", "modules_to_save",
}
_IGNORED_WHEN_DEFAULT = {
    "use_dora": False, "lora_bias": False, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "megatron_config": None, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "alora_invocation_tokens": None, "arrow_config": None,
}


def _from_peft(config: dict, model: nn.Module | None) -> RuleSet:
    peft_type = str(config.get("peft_type", "")).upper().rsplit(".", 1)[-1]
    builders = {"LORA": _from_lora, "PROMPT_TUNING": _from_prompt, "PREFIX_TUNING": _from_prefix}
    if peft_type not in builders:
        raise RuleError(
            f"peft_type {config.get('peft_type')!r} is not supported; supported: {sorted(builders)}"
        )
    return builders[peft_type](config, model)


def _task_options(config: dict) -> tuple[list[str], str | None]:
    """modules_to_save (with PEFT's classifier heads for SEQ_CLS) and the task type."""
    modules_to_save = list(config.get("modules_to_save") or [])
    task_type = str(config["task_type"]).rsplit(".", 1)[-1].upper() if config.get("task_type") else None
    if task_type == "SEQ_CLS":
        modules_to_save += [m for m in _SEQ_CLS_HEADS if m not in modules_to_save]
    return modules_to_save, task_type


def _from_prompt(config: dict, model) -> RuleSet:
    init = str(config.get("prompt_tuning_init", "RANDOM")).rsplit(".", 1)[-1].upper()
    inits = {"RANDOM": "random", "TEXT": "text", "SAMPLE_VOCAB": "vocab"}
    if init not in inits:
        raise RuleError(f"prompt_tuning_init={init!r} is not supported; use one of {sorted(inits)}")
    tokenizer = None
    if init == "TEXT":
        from transformers import AutoTokenizer

        path = config.get("tokenizer_name_or_path")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **(config.get("tokenizer_kwargs") or {}))
        except Exception as e:
            raise RuleError(f"can't load the tokenizer {path!r} for TEXT init (no model hub here: "
                            f"give a local path, or build peftc.Prompt(init='text', tokenizer=...)): {e}") from e
    adapter = Prompt(config.get("num_virtual_tokens") or 0, inits[init],
                     config.get("prompt_tuning_init_text"), tokenizer)
    modules_to_save, task_type = _task_options(config)
    return RuleSet([_as_rule(adapter)], modules_to_save, "none", task_type)


def _from_prefix(config: dict, model) -> RuleSet:
    projection = config.get("encoder_hidden_size") if config.get("prefix_projection") else None
    adapter = Prefix(config.get("num_virtual_tokens") or 0, projection)
    modules_to_save, task_type = _task_options(config)
    return RuleSet([_as_rule(adapter)], modules_to_save, "none", task_type)


def _from_lora(config: dict, model: nn.Module | None) -> RuleSet:
    unsupported = [
        k for k, default in _IGNORED_WHEN_DEFAULT.items()
        if config.get(k, default) not in (default, None, {}, [], False)
    ]
    if unsupported:
        raise RuleError(f"LoraConfig options {unsupported} are not supported by peftc; remove them")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise RuleError(f"init_lora_weights={init!r} is not supported; use True, False or 'gaussian'")
    modules_to_save, task_type = _task_options(config)
    targets = config.get("target_modules")
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in _DEFAULT_TARGETS:
            raise RuleError(f"LoraConfig has no target_modules and peftc has no default for model type {model_type!r}; set target_modules")
        targets = _DEFAULT_TARGETS[model_type]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, config.get("task_type"))
    selector = _PeftTargets(
        targets, config.get("exclude_modules"), config.get("layers_to_transform"),
        config.get("layers_pattern"), modules_to_save,
    )
    adapter = LoRA(
        r=config.get("r", 8), alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
        init=init, use_rslora=config.get("use_rslora", False),
        rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"),
    )
    return RuleSet([Rule(selector, adapter)], modules_to_save, config.get("bias", "none"), task_type)


def _all_linear(model: nn.Module | None, task_type) -> set[str]:
    """PEFT's "all-linear": every nn.Linear / Conv1D except the output head."""
    if model is None:
        raise RuleError('target_modules="all-linear" needs the model; pass rules through peftc.compile')
    from transformers.pytorch_utils import Conv1D

    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and str(task_type or "").upper().endswith("SEQ_CLS"):
        head = next((getattr(model, n) for n in _SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
    if head is not None:
        names -= {n for n, m in model.named_modules() if m is head}
    return names


class _PeftTargets(match.Selector):
    """PEFT's module matching: target/exclude lists or regexes, layer filters."""

    def __init__(self, targets, exclude, layers, layers_pattern, modules_to_save):
        self.targets, self.exclude = targets, exclude
        self.layers = [layers] if isinstance(layers, int) else layers
        self.layers_pattern, self.modules_to_save = layers_pattern, modules_to_save

    def __call__(self, site: Site) -> bool:
        if not site.is_linear:
            return False
        key = site.path
        if self.exclude and _names_match(self.exclude, key):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in self.modules_to_save):
            return False
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, key) is not None
        if key in self.targets:
            return True
        if not any(key.endswith(f".{t}") for t in self.targets):
            return False
        if self.layers:
            return layer_index(key, self.layers_pattern) in self.layers
        return True

    def describe(self):
        return f"peft_target_modules({self.targets!r})"

    def hint(self):
        return self.targets if isinstance(self.targets, str) else next(iter(self.targets), None)


def _names_match(names, key: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def resolve(rules: list[Rule], sites: list[Site]) -> list[tuple[Site, Rule]]:
    """Match every rule against the sites, checking each rule is sound.

    Raises:
        RuleError: a rule matches nothing (with the nearest module paths), puts
            its adapter on an op it doesn't support, or two rules claim one site.
            Overlapping rules are an error rather than "last wins" so that a
            broad rule never silently overrides a specific one; narrow the
            broad one with ``& ~selector``.
    """
    claimed: dict[str, Rule] = {}
    out = []
    for rule in rules:
        hits = [s for s in sites if rule.selector(s)]
        if not hits:
            if isinstance(rule.adapter, (Prefix, Prompt)):
                kind = "scaled_dot_product_attention" if isinstance(rule.adapter, Prefix) else "input-embedding"
                raise RuleError(
                    f"rule {rule} matched no site: the model has no {kind} op peftc can see. "
                    "For attention, load the model with attn_implementation='sdpa'"
                )
            if getattr(rule.selector, "explain_miss", lambda: None)():
                raise RuleError(f"rule {rule} matched no site")
            raise RuleError(f"rule {rule} matched no site. {_nearest(rule, sites)}")
        for site in hits:
            why = rule.adapter.unsupported(site)
            if why:
                raise RuleError(f"rule {rule} selects {site}: {why}. Narrow the selector, e.g. with peftc.linear(...)")
            if site.weight_path in claimed:
                raise RuleError(
                    f"rules {claimed[site.weight_path]} and {rule} both select {site.path}. "
                    "One adapter per site and adapter name: exclude it from one rule with `& ~peftc.module(...)`"
                )
            claimed[site.weight_path] = rule
            out.append((site, rule))
    return out


def _nearest(rule: Rule, sites: list[Site]) -> str:
    paths = list(dict.fromkeys(s.path for s in sites if s.is_linear)) or [s.path for s in sites]
    hint = rule.selector.hint()
    near = difflib.get_close_matches(str(hint), paths, n=5, cutoff=0.2) if hint else []
    shown = near or paths[:5]
    label = "Nearest module paths" if near else "Some linear sites"
    return f"{label}: {', '.join(shown)}" if shown else "The model has no parameter-consuming ops."
