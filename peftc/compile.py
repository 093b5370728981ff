"""``peftc.compile``: trace, match rules, build adapter state, freeze the base."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import RuleError
from .match import discover
from .program import CompiledModel
from .rules import load_rules, resolve
from .trace import Trace, call_inputs, signature, trace, with_defaults


def compile(
    model: nn.Module,
    rules,
    example_inputs=None,
    *,
    backend: str | Callable | None = "inductor",
    adapter_name: str = "default",
    modules_to_save: list[str] | None = None,
) -> CompiledModel:
    """Put adapters on ``model`` where ``rules`` say, and lower the result.

    Arguments:
        model: a transformers model or any ``nn.Module``. Its weights are
            shared, never copied; its parameters are frozen (``requires_grad=False``)
            except for biases PEFT's ``bias`` option names.
        rules: Rules (``peftc.LoRA(r=8).on(peftc.linear(...))``), a rules dict
            or file, or a PEFT config (see :func:`peftc.load_rules`).
        example_inputs: a dict of keyword arguments, a tuple, or a tensor. For
            a transformers text model it may be omitted.
        backend: a ``torch.compile`` backend name or callable; ``"eager"`` skips compilation.
        adapter_name: the name of this adapter (PEFT's ``"default"``); it is active.
        modules_to_save: module-name suffixes to train in full (added to the rules').

    Returns:
        A :class:`~peftc.program.CompiledModel`.

    Raises:
        RuleError: bad rules, or rules that match nothing or conflict.
        TraceError: the model could not be traced with ``example_inputs``.
        Nothing about ``model`` changes when an error is raised.
    """
    args, kwargs = call_inputs(model, example_inputs)
    kwargs = with_defaults(model, kwargs)
    first = trace(model, args, kwargs, signature(args, kwargs, model.training))
    matched, selectors, saved, options = match_rules(model, rules, first, modules_to_save)
    cm = CompiledModel(model, backend, first)
    cm._register(adapter_name, matched, selectors, saved, options)
    for p in model.parameters():
        p.requires_grad_(False)
    train_biases(model, options["bias"], {s.path for s, _ in matched}, saved)
    cm.set_adapter(adapter_name)
    cm._update_trainability()
    return cm


def match_rules(model: nn.Module, rules, catalog: Trace, modules_to_save: list[str] | None):
    """Resolve ``rules`` against the sites of ``catalog``'s graph.

    Returns:
        ``(matched (site, adapter) pairs, the rules' selectors, modules_to_save paths, options)``.
    """
    ruleset = load_rules(rules, model)
    selectors = [rule.selector for rule in ruleset.rules]
    sites = discover(catalog.module(), model, "", selectors)
    matched = [(site, rule.adapter) for site, rule in resolve(ruleset.rules, sites)]
    names = ruleset.modules_to_save + list(modules_to_save or [])
    options = {"bias": ruleset.bias, "modules_to_save": names, "task_type": ruleset.task_type}
    return matched, selectors, _modules_to_save(model, names), options


def _modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths ending with one of ``names`` (PEFT's rule), outermost only."""
    paths = []
    for name in dict.fromkeys(names):
        hits = [p for p, _ in model.named_modules() if p and p.endswith(name)]
        if not hits and name not in ("classifier", "score"):
            raise RuleError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}")
        paths += [p for p in hits if not any(p.startswith(q + ".") for q in hits)]
    return paths


def train_biases(model: nn.Module, bias: str, adapted: set[str], saved: list[str]) -> None:
    """PEFT's ``bias`` option: ``"all"`` biases train, or those of adapted modules (``"lora_only"``).

    The originals of ``modules_to_save`` modules stay frozen: their copies train.
    """
    if bias == "none":
        return
    for name, p in model.named_parameters():
        module_path, _, pname = name.rpartition(".")
        if any(name.startswith(path + ".") for path in saved):
            continue
        if pname == "bias" and (bias == "all" or module_path in adapted):
            p.requires_grad_(True)
