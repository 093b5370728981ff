"""The ``peftc`` command line: ``peftc inspect`` and ``peftc merge``.

::

    peftc inspect MODEL_DIR --rules RULES        # dry run on the meta device: which sites, how many params
    peftc merge MODEL_DIR ADAPTER_DIR --out OUT [--format hf|pt2|onnx] [--force]

MODEL_DIR is a local transformers checkpoint (``config.json`` + weights);
nothing is downloaded, and no code a checkpoint names is run (no
``trust_remote_code``, safetensors weights only). ``merge`` writes OUT
atomically: into a hidden sibling, moved into place once complete and
verified; an existing OUT is replaced only with ``--force``. Exit status: 0 on success, 2 for a usage error, 1 for a
failure, reported as one ``peftc: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .formats.export import FORMATS as EXPORT_FORMATS
from .quiet import quiet

PROG = "peftc"
# Export's formats, hf (the default) first. Importing formats.export here costs ~10 ms:
# importing peftc.cli imports the peftc package, torch included, anyway.
FORMATS = ("hf", *(f for f in EXPORT_FORMATS if f != "hf"))
# Kept at ERROR while a command runs: their warnings and notes are noise on the command line.
LOGGERS = ("torch", "transformers", "onnxscript")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Files copied next to an "hf" export so the folder is a complete checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


class CliError(Exception):
    """A failure reported as ``peftc: error: <message>``, exit status 1."""


def _version() -> str:
    try:  # the installed distribution's; a source tree without metadata: peftc.__version__
        from importlib.metadata import PackageNotFoundError, version

        return version("peftc")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="peftc: a torch.fx graph-rewriting compiler for parameter-efficient fine-tuning.",
        epilog="Exit status: 0 on success, 1 on a failure (one 'peftc: error:' line on stderr), "
               "2 on a usage error. Run 'peftc COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="list the sites a rules file matches, without loading weights",
        description="Dry run: build the model from MODEL_DIR/config.json on the meta device (no "
                    "weights are read), apply RULES, and print every matched site (module path, op, "
                    "shape, adapter, parameter count) and the totals.",
    )
    inspect.add_argument("model_dir", metavar="MODEL_DIR",
                         help="a local transformers checkpoint folder (only its config.json is read)")
    inspect.add_argument("--rules", required=True, metavar="RULES",
                         help="a rules file (.json, .yaml/.yml, .toml), or a PEFT adapter_config.json "
                              "(or the folder holding one)")
    inspect.add_argument("--json", action="store_true",
                         help="print the sites and totals as JSON instead of a table")

    merge = commands.add_parser(
        "merge",
        help="merge a PEFT-format adapter into a checkpoint and export it",
        description="Load the transformers checkpoint in MODEL_DIR and the PEFT-format adapter in "
                    "ADAPTER_DIR (adapter_config.json + adapter_model.safetensors; LoRA, prompt or "
                    "prefix tuning), merge it into the weights, export to OUT, load the export back "
                    "and check its outputs against the unmerged model's.",
    )
    merge.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers checkpoint folder")
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                       help="a PEFT-format adapter folder (saved by PEFT or by peftc)")
    merge.add_argument("--out", "-o", required=True, metavar="OUT",
                       help="where to write: a folder for 'hf'; for 'pt2'/'onnx' a file "
                            "(a folder or a path without a suffix gets model.pt2 / model.onnx inside)")
    merge.add_argument("--format", "-f", choices=FORMATS, default="hf",
                       help="hf: the model class with merged weights (save_pretrained; tokenizer files "
                            "are copied along); pt2: a torch.export ExportedProgram; onnx: an ONNX model. "
                            "Prompt and prefix adapters need pt2 or onnx. Default: %(default)s")
    merge.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="the dtype to load the model in (auto: the checkpoint's). Default: %(default)s")
    merge.add_argument("--atol", type=float, default=None, metavar="TOL",
                       help="verification tolerance (absolute and relative). "
                            "Default: 1e-4 for float32, 2e-2 for float16/bfloat16")
    merge.add_argument("--no-verify", action="store_true",
                       help="skip loading the export back and comparing it with the unmerged model")
    merge.add_argument("--force", action="store_true",
                       help="replace an existing OUT (by default an existing export is never overwritten)")
    merge.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2 here
    try:
        with quiet(LOGGERS):
            if args.command == "inspect":
                return inspect_command(args)
            return merge_command(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _reportable(e):
            raise
        print(f"{PROG}: error: {_joined_lines(e)}", file=sys.stderr)
        return 1


def _reportable(e: BaseException) -> bool:
    from .errors import PeftcError

    return isinstance(e, (CliError, PeftcError, OSError))


def _joined_lines(e: BaseException) -> str:
    """All of ``e``'s message on one line (its lines joined by "; "), for the one ``peftc: error:``
    line. Not :func:`peftc.errors.first_line`, which keeps the first line only: later lines
    can say what to do (a TraceError's "Try: ..."), or are the cause a library reports."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


# -- the model ------------------------------------------------------------------------


def _checkpoint(model_dir: str) -> Path:
    folder = Path(model_dir)
    if not folder.exists():
        raise CliError(f"model directory {model_dir} does not exist")
    if not folder.is_dir():
        raise CliError(f"{model_dir} is not a directory; MODEL_DIR is a transformers checkpoint folder")
    if not (folder / "config.json").is_file():
        raise CliError(f"{model_dir} has no config.json: not a transformers checkpoint folder")
    return folder


def _model_class(folder: Path):
    import transformers

    _quiet_transformers()
    try:
        # never code the checkpoint names (config.auto_map): transformers' own classes only
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise CliError(f"can't read {folder / 'config.json'}: {_joined_lines(e)}") from e
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise CliError(f"{folder / 'config.json'} names no architectures; peftc needs the model class "
                       "in config.architectures (save the model with save_pretrained)")
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise CliError(f"transformers {transformers.__version__} has no model class {architectures[0]!r} "
                       f"(from {folder / 'config.json'})")
    return cls, config


def _meta_model(folder: Path):
    import torch

    cls, config = _model_class(folder)
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:
        raise CliError(f"can't build {cls.__name__} from {folder / 'config.json'}: {_joined_lines(e)}") from e
    return model.eval()


def _load_model(folder: Path, dtype: str):
    import torch

    cls, config = _model_class(folder)
    try:
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,  # no pickles
                                    trust_remote_code=False,
                                    dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except OSError:
        raise
    except Exception as e:
        raise CliError(f"can't load {cls.__name__} from {folder}: {_joined_lines(e)}") from e
    return model.eval()


# -- inspect ---------------------------------------------------------------------------


def inspect_command(args) -> int:
    folder = _checkpoint(args.model_dir)
    rules_path = Path(args.rules)
    if not rules_path.exists():
        raise CliError(f"rules file {args.rules} does not exist")
    import peftc

    model = _meta_model(folder)
    rules = _inspected_rules(rules_path, model)
    cm = peftc.compile(model, rules, backend="eager")
    rows, adapter_params = _site_rows(cm)
    saved = [{"path": path, "adapter": name, "params": sum(p.numel() for p in clone.parameters())}
             for name in cm.adapters for path, clone in cm.saved_modules(name).items()]
    trainable, total = cm.get_nb_trainable_parameters()
    summary = {
        "model": type(model).__name__,
        "model_dir": str(folder),
        "rules": str(rules_path),
        "sites": rows,
        "num_sites": len(rows),
        "adapter_params": adapter_params,
        "modules_to_save": saved,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100 * trainable / total if total else 0.0,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_table(summary))
    return 0


def _inspected_rules(path: Path, model):
    """The rules in ``path``. A PEFT adapter config is read as a checkpoint's: initialisation is
    moot in a dry run, so a text-initialised prompt builds no tokenizer (nothing it names is read)."""
    import peftc
    from peftc.formats.peft import CONFIG_NAME
    from peftc.rules import checkpoint_rules

    config_path = path / CONFIG_NAME if path.is_dir() else path
    if config_path.suffix == ".json" and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            config = None  # load_rules reports it
        if isinstance(config, dict) and "peft_type" in config:
            return checkpoint_rules(config, model, str(config_path))
    return peftc.load_rules(path, model)


def _site_rows(cm) -> tuple[list[dict], int]:
    """One row per matched site; a state shared by several sites (prefix, prompt) counts once."""
    rows, seen, total = [], set(), 0
    for p in cm.sites:
        key = id(p.state)
        shared = key in seen
        seen.add(key)
        params = 0 if shared else p.num_params
        total += params
        rows.append({
            "path": p.path,
            "op": str(p.op),
            "shape": _shape(p.site),
            "adapter": f"{p.adapter_name}: {p.adapter!r}",
            "params": params,
            "shared": shared,
        })
    return rows, total


def _shape(site) -> str:
    if site.is_linear:
        return f"{site.in_features} -> {site.out_features}"
    if site.kind == "attention":
        return f"{site.heads} heads x {site.head_dim}"
    if site.kind == "experts":
        return f"{site.weight_name}: {site.experts} experts x {site.in_features} -> {site.out_features}"
    return site.kind


def _table(summary: dict) -> str:
    header = ("module path", "op", "shape", "adapter", "params")
    body = [(r["path"] or "(model)", r["op"], r["shape"], r["adapter"],
             "shared" if r["shared"] else f"{r['params']:,d}") for r in summary["sites"]]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row):
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1], strict=True)]
        return "  ".join([*cells, row[-1].rjust(widths[-1])]).rstrip()

    out = [f"{summary['model']} from {summary['model_dir']} (meta device: no weights loaded); "
           f"rules: {summary['rules']}", "", line(header), line(tuple("-" * w for w in widths))]
    out += [line(row) for row in body]
    out.append("")
    for m in summary["modules_to_save"]:
        out.append(f"modules_to_save: {m['path']} ({m['adapter']}): {m['params']:,d} params, a trainable copy")
    out += [
        f"matched sites: {summary['num_sites']} || adapter params: {summary['adapter_params']:,d}",
        f"trainable params: {summary['trainable_params']:,d} || all params: {summary['all_params']:,d} || "
        f"trainable%: {summary['trainable_percent']:.4f}",
    ]
    return "\n".join(out)


# -- merge -----------------------------------------------------------------------------


class _Stages:
    """A tqdm bar over the named stages (on stderr)."""

    NAMES = ("load model", "load adapter", "merge", "export", "verify")

    def __init__(self, quiet: bool, verify: bool):
        from tqdm.auto import tqdm

        names = self.NAMES if verify else self.NAMES[:-1]
        self.width = max(len(n) for n in names)
        self.bar = tqdm(total=len(names), unit="stage", disable=quiet, file=sys.stderr,
                        desc=f"{PROG} merge: {'':<{self.width}}",
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}]")
        self.current: str | None = None

    def start(self, name: str) -> None:
        if self.current is not None:
            self.bar.update(1)
        self.current = name
        self.bar.set_description_str(f"{PROG} merge: {name:<{self.width}}")

    def close(self, ok: bool) -> None:
        if ok and self.current is not None:
            self.bar.update(1)
            self.bar.set_description_str(f"{PROG} merge: {'done':<{self.width}}")
        else:
            self.bar.leave = False  # on failure, the error line alone
        self.bar.close()


def merge_command(args) -> int:
    folder = _checkpoint(args.model_dir)
    adapter = Path(args.adapter_dir)
    if not adapter.exists():
        raise CliError(f"adapter directory {args.adapter_dir} does not exist")
    if not (adapter / "adapter_config.json").is_file():
        raise CliError(f"{args.adapter_dir} has no adapter_config.json: not a PEFT adapter folder")
    if args.format == "hf":
        _check_hf_adapter(adapter)
    import peftc
    from peftc.formats.atomic import staged
    from peftc.formats.export import export_model, target_path

    out = target_path(args.out, args.format)
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to replace it (it is replaced only once the new "
                       "export is complete and verified)")

    stages = _Stages(args.quiet, not args.no_verify)
    ok = False
    try:
        stages.start("load model")
        model = _load_model(folder, args.dtype)
        stages.start("load adapter")
        cm = peftc.from_pretrained(model, adapter, backend="eager")
        # export_model writes atomically on its own; staged here too, so the tokenizer files
        # land with the export in one move
        with staged(out) as written:
            result = export_model(cm, written, args.format, verify=not args.no_verify, atol=args.atol,
                                  rtol=args.atol, on_stage=stages.start)
            if args.format == "hf":
                _copy_tokenizer(folder, written)
        result.path = out
        ok = True
    finally:
        stages.close(ok)
    if not args.quiet:
        how = "merged" if result.merged else "prompt/prefix adapter baked into the graph"
        print(f"wrote {result.path} ({args.format}, {how}); inputs: {', '.join(result.inputs)}; "
              f"outputs: {', '.join(result.outputs)}")
        if result.max_diff is not None:
            shapes = "; ".join(", ".join(f"{k}{list(v)}" for k, v in s.items()) for s in result.checked_shapes)
            print(f"verified against the unmerged model: max |diff| {result.max_diff:.3g} on {shapes}")
    return 0


def _check_hf_adapter(adapter: Path) -> None:
    """Fail before loading anything when the adapter can't be merged into weights."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return  # peftc.from_pretrained reports it
    kind = str(config.get("peft_type", "") if isinstance(config, dict) else "").upper().rsplit(".", 1)[-1]
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        raise CliError(f"{adapter} holds a {kind} adapter, which adds virtual tokens rather than weight "
                       "deltas, so format 'hf' (weights only) can't hold it. Use --format pt2 or "
                       "--format onnx: they bake the adapter into the exported graph")


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        src = source / name
        if src.is_file() and not (target / name).exists():
            shutil.copy2(src, target / name)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
