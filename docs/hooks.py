"""MkDocs hook: pages generated at every build, so they cannot drift: the configuration and command-line
references from the code (the pydantic models, the argparse parsers), and the home page from the README."""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import inspect
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
# The typed configs a user writes: (title, model, dotted prefix, where it is written)
CONFIGS = [("Pretraining run (`launch/pretrain.py --config`)", "mlfound.config:RunConfig", ""),
           ("Fine-tuning (`launch/finetune.py`, `mlfound.finetune.finetune`)", "mlfound.finetune:FinetuneConfig", ""),
           ("Paper experiment (`tools/paper_experiment.py --experiment`)", "experiments.config:Experiment", "")]
# Every command, as a user types it; `mlfound` also lists each subcommand
COMMANDS = ["mlfound", "launch/pretrain.py", "launch/finetune.py", "tools/shard_dataset.py", "tools/make_qm_dataset.py",
            "tools/run_md.py", "tools/compare_scratch.py", "tools/paper_experiment.py", "tools/bench_data.py",
            "tools/bench_loader.py", "tools/bench_shard.py", "tools/bench_pretrain.py", "tools/bench_peers.py",
            "tools/bench_zero_memory.py", "tools/bench_batched_md.py", "tools/probe_two_stage.py"]


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, text in (("index.md", home_page()), ("reference/config.md", config_reference()),
                      ("reference/cli.md", cli_reference())):
        files.append(File.generated(config, uri, content=text))
    return files


def home_page() -> str:
    """The README, whose links into docs/ become the site's own: one text for GitHub and the site."""
    return (ROOT / "README.md").read_text().replace("](docs/", "](")


# -- configuration ------------------------------------------------------------------------------------------
def config_reference() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the pydantic models at every build. YAML files give these keys; any key can be "
             "overridden on the command line as `section.key=value`; an unknown or mistyped key is an error "
             "naming it.", ""]
    for title, target, prefix in CONFIGS:
        lines += [f"## {title}", ""]
        lines += _model_tables(_import(target), prefix)
    return "\n".join(lines + methods_table()) + "\n"


def methods_table() -> list[str]:
    """The methods of ``meta.method``: what each sets (mlfound/meta/methods.py)."""
    from mlfound.meta.methods import METHODS

    lines = ["## Methods (`meta.method`, `pretrain.methods`)", "",
             "Named points of the one outer step (`mlfound/meta/methods.py`); a config may set any field on top.", "",
             "| method | k | inner | outer | heads rescaled | what it is |", "|---|---|---|---|---|---|"]
    for name, method in METHODS.items():
        meta = method["meta"]
        inner = f"{meta['inner']['name']} {meta['inner']['lr']:g}"
        outer = f"{meta['outer']['name']} {meta['outer']['lr']:g} → {meta['outer']['lr_final']:g}"
        lines.append(f"| `{name}` | {meta['inner_steps']} | {inner} | {outer} | {meta['rescale_heads']} | "
                     f"{_cell(method['description'])} |")
    return lines


def _model_tables(model: type[BaseModel], prefix: str) -> list[str]:
    """One table for ``model``'s own fields, then one section per nested model, depth first."""
    rows, nested = [], []
    comments = _field_comments(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _nested_model(field.annotation)
        if inner is not None:
            nested.append((key, inner))
            continue
        meaning = field.description or comments.get(name, "")
        rows.append(f"| `{key}` | `{_type_name(field.annotation)}` | {_default(field)} | {_cell(meaning)} |")
    out = []
    if rows:
        doc = _cell(inspect.getdoc(model) or "") if model.__doc__ else ""
        out += ([doc, ""] if doc else []) + ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for key, inner in nested:
        out += [f"### `{key}`", ""] + _model_tables(inner, f"{key}.")
    return out


def _nested_model(annotation) -> type[BaseModel] | None:
    """The model a field holds (also ``Model | None``), else None."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    models = [a for a in options if inspect.isclass(a) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """A field's meaning from the source when it has no description: its trailing comment, or the comment
    lines right above it; inherited fields' from the class that declares them."""
    comments = {}
    for cls in reversed([c for c in model.__mro__ if issubclass(c, BaseModel) and c is not BaseModel]):
        above = []
        for line in inspect.getsource(cls).splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            match = re.match(r"\s{4}(\w+)\s*:", line)
            if match and not line.startswith(" " * 5):
                trailing = line.split("  # ", 1)[1] if "  # " in line else ""
                comments[match.group(1)] = " ".join([*above, trailing]).strip()
            above = []
    return comments


def _type_name(annotation) -> str:
    text = annotation.__name__ if inspect.isclass(annotation) else str(annotation)
    return re.sub(r"\b(typing|pathlib|mlfound\.[\w.]+)\.", "", text).replace("NoneType", "None")


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        set_by = (field.json_schema_extra or {}).get("set_by")
        return f"from `{set_by}`" if set_by else "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    return f"`{value!r}`" if not isinstance(value, BaseModel) else "(section)"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _import(target: str):
    if str(ROOT) not in sys.path:  # experiments/ lives beside mlfound, not installed (at call time: mkdocs
        sys.path.insert(0, str(ROOT))  # takes its own entry back off sys.path after loading this file)
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# -- command line -------------------------------------------------------------------------------------------
PARSE_METHODS = ("parse_args", "parse_intermixed_args")  # what the commands call


class _Parsed(BaseException):
    """Raised instead of parsing: carries the parser a command built (BaseException: no command catches it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def cli_reference() -> str:
    lines = ["# Command-line reference", "",
             "Generated from each command's argparse parser at every build: what `--help` prints.", ""]
    for command in COMMANDS:
        parser = command_parser(command)
        lines += [f"## `{command}`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in _subcommands(parser).items():
            if sub.add_help is False:  # forwarded (mlfound shard, pretrain, finetune): the command's own parser
                sub = command_parser(f"{command} {name}")
            lines += [f"### `{command} {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser ``command``'s main builds, caught before it parses anything (nothing else runs)."""
    if command.startswith("mlfound"):
        from mlfound.cli import _main

        main = functools.partial(_main, command.split()[1:])
    else:
        path = ROOT / command
        spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main = getattr(module, "_main", None) or module.main
    originals = {name: getattr(argparse.ArgumentParser, name) for name in PARSE_METHODS}

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    for name in PARSE_METHODS:
        setattr(argparse.ArgumentParser, name, capture)
    try:
        with contextlib.redirect_stdout(sys.stderr), _argv(command):
            main(*([[]] if inspect.signature(main).parameters else []))
    except _Parsed as parsed:
        parsed.parser.prog = command if command.startswith("mlfound") else f"python {command}"
        return parsed.parser
    finally:
        for name, method in originals.items():
            setattr(argparse.ArgumentParser, name, method)
    raise RuntimeError(f"{command}: its main returned without parsing arguments")


@contextlib.contextmanager
def _argv(command: str):
    saved, sys.argv = sys.argv, [command]
    try:
        yield
    finally:
        sys.argv = saved


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}
