"""Rules: which adapter goes on which sites, from Python, files, or a PEFT config.

A rule is data, ``Rule(selector, adapter)``; ``adapter.on(selector)`` builds one.
The same rules can be written as a dict (or a JSON / YAML / TOML file)::

    {"rules": [{"adapter": {"kind": "lora", "r": 16, "alpha": 32},
                "select": {"linear": ".*\\\\.(q|v)_proj", "layers": [0, 1]}}],
     "modules_to_save": ["classifier"]}

A ``"quantize"`` key stores the frozen linears in 4 bits (QLoRA): ``"nf4"``, or
``{"quant_type": "nf4", "double_quant": true, "compute_dtype": "bfloat16",
"blocksize": 64, "select": {...}}`` (see :class:`peftc.Quantize`).

``select`` is ``{"linear" | "convolution" | "module": regex or null, "layers": [...],
"layers_pattern": name}``, ``{"experts": regex or null, "layers": [...], "indices": [...]}``,
``{"op": [names]}``, or ``{"any" | "all": [selects]}``
and ``{"not": select}`` for composition. A PEFT ``adapter_config.json`` (or a
``LoraConfig``) is accepted anywhere rules are; :mod:`peftc.peft_config`
translates it.

:func:`match_rules` resolves rules against a traced graph's sites.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx, nn

from . import match, peft_config
from .adapters.base import Adapter, Rule, adapter_from_config
from .errors import PeftcError, RuleError
from .quantization import Quantize, quantize_spec
from .sites import EXPERTS, Site


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
        quantize: store the frozen linear weights in 4 bits (:class:`peftc.Quantize`), or None.
    """

    rules: list[Rule]
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    task_type: str | None = None
    quantize: Quantize | None = None

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
        return RuleSet(*peft_config.to_rules(source.to_dict(), model))
    if isinstance(source, dict):
        if "peft_type" in source:
            return RuleSet(*peft_config.to_rules(source, model))
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
    unknown = set(data) - {"rules", "modules_to_save", "bias", "quantize"}
    if unknown or "rules" not in data:
        raise RuleError(
            f"a rules dict has keys 'rules' (required), 'modules_to_save', 'bias', 'quantize'; got {sorted(data)}"
        )
    rules = []
    for i, item in enumerate(data["rules"]):
        if not isinstance(item, dict) or set(item) != {"adapter", "select"}:
            raise RuleError(f"rule {i}: expected {{'adapter': {{...}}, 'select': {{...}}}}, got {item!r}")
        rules.append(Rule(_selector_from_dict(item["select"]), adapter_from_config(item["adapter"])))
    quantize = data.get("quantize")
    if isinstance(quantize, dict) and quantize.get("select") is not None:
        quantize = {**quantize, "select": _selector_from_dict(quantize["select"])}
    return RuleSet(rules, list(data.get("modules_to_save") or []), data.get("bias", "none"), None,
                   quantize_spec(quantize))


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
    if "experts" in data:
        extra = set(data) - {"experts", "layers", "layers_pattern", "indices"}
        if extra:
            raise RuleError(f"unknown selector keys {sorted(extra)} in {data!r}")
        return match.experts(data["experts"], data.get("layers"), data.get("layers_pattern"), data.get("indices"))
    for kind in ("linear", "convolution", "module"):
        if kind in data:
            extra = set(data) - {kind, "layers", "layers_pattern"}
            if extra:
                raise RuleError(f"unknown selector keys {sorted(extra)} in {data!r}")
            return getattr(match, kind)(data[kind], data.get("layers"), data.get("layers_pattern"))
    raise RuleError(f"unknown selector {data!r}: use linear, convolution, module, experts, op, any, all or not")


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
        rule.selector.check_sites(sites)
        hits = rule.selector.select(sites)
        if not hits:
            hint = rule.adapter.no_site_hint()
            if hint:
                raise RuleError(f"rule {rule} matched no site: {hint}")
            if getattr(rule.selector, "explain_miss", lambda: None)():
                raise RuleError(f"rule {rule} matched no site")
            raise RuleError(f"rule {rule} matched no site. {_nearest(rule, sites)}")
        for site in hits:
            why = rule.adapter.unsupported(site)
            if why:
                if site.kind == EXPERTS:
                    narrow = "e.g. with & ~peftc.experts()"
                elif rule.adapter.default_selector() is not None:  # prompt learning: its own sites
                    narrow = f"or give {type(rule.adapter).__name__} no selector: its default picks the sites it takes"
                else:
                    narrow = "e.g. with peftc.linear(...)"
                raise RuleError(f"rule {rule} selects {site}: {why}. Narrow the selector, {narrow}")
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


def match_rules(model: nn.Module, rules, graph: fx.GraphModule, modules_to_save: list[str] | None = None):
    """Load ``rules`` and resolve them against the sites of ``graph`` (a trace of ``model``).

    Returns:
        ``(matched (site, adapter) pairs, the rules' selectors, modules_to_save module paths,
        options)``; options are PEFT's ``bias``, ``modules_to_save`` names and ``task_type``.
    """
    ruleset = load_rules(rules, model)
    selectors = [rule.selector for rule in ruleset.rules]
    sites = match.discover(graph, model, "", selectors)
    matched = [(site, rule.adapter) for site, rule in resolve(ruleset.rules, sites)]
    names = ruleset.modules_to_save + list(modules_to_save or [])
    options = {"bias": ruleset.bias, "modules_to_save": names, "task_type": ruleset.task_type}
    return matched, selectors, _module_paths(model, names), options


def _module_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths ending with one of ``names`` (PEFT's modules_to_save rule), outermost only."""
    paths = []
    for name in dict.fromkeys(names):
        hits = [p for p, _ in model.named_modules() if p and p.endswith(name)]
        if not hits and name not in peft_config.SEQ_CLS_HEADS:
            raise RuleError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}")
        paths += [p for p in hits if not any(p.startswith(q + ".") for q in hits)]
    return paths


def checkpoint_rules(config: dict, model: nn.Module | None, source: str = "") -> RuleSet:
    """The rules that rebuild a saved adapter so its saved tensors can be loaded into it.

    Initialisation is moot when the weights come from the file, so nothing is
    built for it: a text-initialised prompt adapter needs no tokenizer (none is
    loaded, and nothing a config names is imported), and a prefix or P-tuning
    adapter's saved table is already projected (encoded).

    Raises:
        PeftcError: a ``peft_type`` peftc doesn't load.
    """
    kind = peft_config.peft_type(config)
    if kind not in peft_config.supported_peft_types():
        raise PeftcError(f"{source or 'the adapter config'}: unknown peft_type {config.get('peft_type')!r}; "
                         f"peftc loads {', '.join(peft_config.supported_peft_types())}")
    if kind == "PROMPT_TUNING":
        config = {**config, "prompt_tuning_init": "RANDOM"}
    elif kind == "PREFIX_TUNING":
        config = {**config, "prefix_projection": False}
    elif kind == "P_TUNING":  # the saved tokens are the encoder's output: no encoder to build
        config = {**config, "inference_mode": True}
    return load_rules(config, model)
