"""The study config (run_study.py's `--config`): its schema, every check of a config before anything runs or is
created, and what the config maps onto: the command-line flags of a stage (`to_flags`) and the fine-tuned
models (`glue_runs`).

`validate_study` checks the config against `SCHEMA` (keys, types), then its cross-references (model names,
tasks, seeds, checkpoint steps), then every flag against the script it is passed to: its name and type by
that script's own `build_argument_parser()`, each model's flags by its `parse_args` and the config class's
checks. Every problem is one ConfigError naming the key (one line and exit status 2 from run_study.py).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad study config or --data: reported as one line with exit status 2, before anything is created."""


# ----------------------------------------------------------------------------------------------------------
# The study config's schema: every section and key, its type and whether it is required. Flag mappings
# (`Flags`) are checked against the flags of the script they are passed to.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flags:
    """A {flag: value} mapping onto `script`'s command line (values: scalars or lists of scalars)."""

    script: str


@dataclass(frozen=True)
class Named:
    """{name: Flags(script)}, at least one entry (models, or per-task flags)."""

    script: str


@dataclass(frozen=True)
class ListOf:
    """A non-empty list of `item`."""

    item: type


TRAINER, CONVERTER, FINETUNER = "wikitext_trainer.py", "convert_bert_checkpoint.py", "run_glue.py"
SCHEMA: dict[str, tuple[Any, bool]] = {
    "description": (str, False),
    "pretrain": (
        {
            "common": (Flags(TRAINER), False),
            "tokenizer": (Flags(TRAINER), False),
            "models": (Named(TRAINER), True),
        },
        False,
    ),
    "convert": ({"bert_path": (str, False), "models": (Named(CONVERTER), True)}, False),
    # score_rtd.py's fixed evaluation set, built from `reference` (a pretrain model, pretrained first)
    "fixed_eval": ({"reference": (str, True), "max_examples": (int, False), "seed": (int, False)}, False),
    "glue": (
        {
            "tasks": (ListOf(str), True),
            "seeds": (ListOf(int), True),
            "args": (Flags(FINETUNER), False),
            "random_init_baselines": (list, False),
            "models": (ListOf(str), False),
            "task_args": (Named(FINETUNER), False),
            "baseline": (str, False),
            "checkpoint_steps": (ListOf(int), False),
        },
        True,
    ),
}
SCALARS = (str, int, float, bool, type(None))
# A model name is a folder name (outputs/<study>/pretrain/<name>, glue/<name>).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


def is_instance(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_keys(value: dict, schema: dict[str, tuple[Any, bool]], where: str) -> None:
    """Unknown keys (with the closest known one) and missing required keys of one section."""
    prefix = f"{where}." if where else ""
    for key in value:
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known: {', '.join(schema)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    for key, (_, required) in schema.items():
        if required and key not in value:
            raise ConfigError(f"missing required key '{prefix}{key}'")


def check_flags(value: Any, where: str, flag_sets: list[tuple[str, str, dict]], script: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"'{where}' must be an object of {script} flags, got {json.dumps(value)}")
    for key, flag_value in value.items():
        items = flag_value if isinstance(flag_value, list) else [flag_value]
        if not all(isinstance(item, SCALARS) for item in items):
            raise ConfigError(
                f"'{where}.{key}' must be a flag value (scalar or list), got {json.dumps(flag_value)}"
            )
    flag_sets.append((script, where, value))


def validate_node(value: Any, spec: Any, where: str, flag_sets: list[tuple[str, str, dict]]) -> None:
    """Check `value` against `spec` (a type, ListOf, Flags, Models or a section dict); collect flag mappings."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"'{where or 'the config'}' must be an object, got {json.dumps(value)[:80]}")
        check_keys(value, spec, where)
        for key, item in value.items():
            validate_node(item, spec[key][0], f"{where}.{key}" if where else key, flag_sets)
    elif isinstance(spec, Flags):
        check_flags(value, where, flag_sets, spec.script)
    elif isinstance(spec, Named):
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"'{where}' must be a non-empty object of name -> {spec.script} flags")
        for name, options in value.items():
            check_flags(options, f"{where}.{name}", flag_sets, spec.script)
    elif isinstance(spec, ListOf):
        if not isinstance(value, list) or not value or not all(is_instance(v, spec.item) for v in value):
            expected = f"a non-empty list of {TYPE_NAMES[spec.item].split(' ', 1)[1]}s"
            raise ConfigError(f"'{where}' must be {expected}, got {json.dumps(value)}")
    elif not is_instance(value, spec):
        raise ConfigError(f"'{where}' must be {TYPE_NAMES[spec]}, got {json.dumps(value)}")


def script_flags(script: str) -> set[str]:
    """The long option names (without `--`) of a script's command line, from its build_argument_parser()."""
    return option_names(importlib.import_module(Path(script).stem).build_argument_parser())


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option a parser takes, aliases included, read from its help text (argparse has no public
    way to list them): each option's line starts with its option strings, indented 2 columns, and ends
    where two spaces separate them from the help text."""
    names = set()
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            invocation = line[2:].split("  ")[0]
            names |= {word[2:] for word in re.split(r"[ ,]+", invocation) if word.startswith("--")}
    return names


def validate_study(study: Any, check_flag_names: bool = True) -> None:
    """The whole config against SCHEMA, then the cross-references, then every flag name: one ConfigError."""
    flag_sets: list[tuple[str, str, dict]] = []
    validate_node(study, SCHEMA, "", flag_sets)
    if "pretrain" not in study and "convert" not in study:
        raise ConfigError(
            'needs a "pretrain" or a "convert" section (both: pretraining continued from converted models)'
        )
    from glue_tasks import TASKS

    for task in study["glue"]["tasks"]:
        if task not in TASKS:
            close = difflib.get_close_matches(task, list(TASKS), n=1)
            raise ConfigError(
                f"'glue.tasks': unknown task '{task}'" + (f" (did you mean '{close[0]}'?)" if close else "")
            )
    models = [*study.get("convert", {}).get("models", {}), *study.get("pretrain", {}).get("models", {})]
    if len(set(models)) < len(models):
        raise ConfigError(f"model names must be unique across convert and pretrain, got {models}")
    converted = study.get("convert", {}).get("models", {})
    for name, options in study.get("pretrain", {}).get("models", {}).items():
        source = options.get("init_discriminator_from")
        if source is not None and source not in converted and not Path(str(source)).is_dir():
            raise ConfigError(
                f"'pretrain.models.{name}.init_discriminator_from': '{source}' is neither a converted model "
                f"{list(converted)} nor a directory"
            )
    reference = study.get("fixed_eval", {}).get("reference")
    if reference is not None and reference not in study.get("pretrain", {}).get("models", {}):
        raise ConfigError(f"'fixed_eval.reference': '{reference}' is not one of the pretrain models")
    for task in study["glue"].get("task_args", {}):
        if task not in study["glue"]["tasks"]:
            raise ConfigError(f"'glue.task_args': '{task}' is not one of glue.tasks {study['glue']['tasks']}")
    for key in ("random_init_baselines", "models"):
        for name in study["glue"].get(key, []):
            if name not in models:
                raise ConfigError(f"'glue.{key}': '{name}' is not one of the study's models {models}")
    baseline = study["glue"].get("baseline")
    check_checkpoint_steps(study)
    fine_tuned = [label for label, _, _, _ in glue_runs(study["glue"], models)]
    if baseline is not None and baseline not in fine_tuned:
        raise ConfigError(f"'glue.baseline': '{baseline}' is not one of the fine-tuned models {fine_tuned}")
    check_names_and_seeds(study, models)
    if check_flag_names:
        known = {script: script_flags(script) for script in {script for script, _, _ in flag_sets}}
        for script, where, options in flag_sets:
            for key, value in options.items():
                if key not in known[script]:
                    close = difflib.get_close_matches(key, sorted(known[script]), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ConfigError(f"'{where}.{key}' is not a flag of {script}{hint}")
                check_flag_type(script, key, value, f"{where}.{key}")
        check_model_flags(study)


def check_names_and_seeds(study: dict, models: list[str]) -> None:
    """Model names that are folder names (each is one), and each seed once (each is one run per cell)."""
    for name in models:
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(
                f"model name '{name}' cannot be a folder name; use letters, digits, '.', '_' and '-' only"
            )
    seeds = study["glue"]["seeds"]
    duplicates = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if duplicates:
        raise ConfigError(f"'glue.seeds' lists {duplicates} more than once; each seed is one run per cell")


def check_checkpoint_steps(study: dict) -> None:
    """`glue.checkpoint_steps` needs pretrained models that save a checkpoint at each of those steps."""
    steps = study["glue"].get("checkpoint_steps", [])
    if steps and "pretrain" not in study:
        raise ConfigError(
            "'glue.checkpoint_steps' names pretraining checkpoints: it needs a \"pretrain\" section"
        )
    save_steps = study.get("pretrain", {}).get("common", {}).get("save_steps")
    unsaved = [step for step in steps if step < 1 or (save_steps and step % save_steps)]
    if unsaved:
        raise ConfigError(
            f"'glue.checkpoint_steps': {unsaved} are not multiples of pretrain.common.save_steps ({save_steps}), "
            "so no checkpoint is saved there"
        )


def parsed_flag(script: str, key: str, value: Any, where: str) -> tuple[Any, list[str]]:
    """A config option parsed as its command line would be, by the script's own build_argument_parser()
    (public argparse API only): the parsed value and the words the flag did not take. The script's required
    flags, named by argparse's own error, get a stand-in value (the first of their choices, if any)."""
    parser = importlib.import_module(Path(script).stem).build_argument_parser()
    argv, stand_ins = to_flags({key: value}), {}
    for _ in range(10):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args, rest = parser.parse_known_args(argv + [w for item in stand_ins.items() for w in item])
            return vars(args).get(key.replace("-", "_")), rest
        except SystemExit:
            message = (stderr.getvalue().strip().splitlines() or ["rejected"])[-1].split(": error: ", 1)[-1]
        required = re.fullmatch(r"the following arguments are required: (.*)", message)
        choice = re.fullmatch(
            r"argument (--\w+)(?:/--[\w-]+)*: invalid choice: .* \(choose from '([^']*)'.*", message
        )
        flags = [names.split("/")[0] for names in required.group(1).split(", ")] if required else []
        if required and f"--{key}" not in flags:
            stand_ins |= {flag: "-" for flag in flags}
        elif choice and choice.group(1) in stand_ins:
            stand_ins[choice.group(1)] = choice.group(2)
        else:
            raise ConfigError(f"'{where}': {message}")
    raise ConfigError(f"'{where}': {script} rejected its stand-in values")


def check_flag_type(script: str, key: str, value: Any, where: str) -> None:
    """A config value must have the type its flag parses: a switch takes true/false, a numeric flag a
    number (not a string, which the command line would silently accept), a list only where the flag
    takes several values."""
    if isinstance(value, bool):
        try:
            parsed = parsed_flag(script, key, True, where)[0] if value else True
        except ConfigError:  # "expected one argument": not a switch
            parsed = None
        if not isinstance(parsed, bool):
            kind = type(parsed_flag(script, key, "1", where)[0])
            raise ConfigError(f"'{where}' must be {TYPE_NAMES.get(kind, 'a value')}, got {json.dumps(value)}")
        return
    parsed, rest = parsed_flag(script, key, value, where)
    if rest:
        if isinstance(value, list):
            raise ConfigError(f"'{where}' takes one value, got the list {json.dumps(value)}")
        raise ConfigError(f"'{where}' is a switch: give true or false, got {json.dumps(value)}")
    values = value if isinstance(value, list) else [value]
    parsed_values = parsed if isinstance(parsed, list) else [parsed]
    for item, parsed_item in zip(values, parsed_values, strict=False):
        numeric = isinstance(parsed_item, int | float) and not isinstance(parsed_item, bool)
        kind = type(parsed_item) if numeric else str
        if item is not None and not is_instance(item, kind):
            raise ConfigError(f"'{where}' must be {TYPE_NAMES[kind]}, got {json.dumps(item)}")


def model_config_error(argv: list[str]) -> str | None:
    """ElectraMoEConfig's own checks of the model a pretraining command line describes, through the trainer's
    config builder (the vocabulary does not exist yet: the tokenizer may be trained by the stage; its size
    enters no check)."""
    from pretrain_models import build_model_configs

    try:
        build_model_configs(importlib.import_module(Path(TRAINER).stem).parse_args(argv), tokenizer_size=1000)
    except ValueError as error:
        return str(error)
    return None


def check_model_flags(study: dict) -> None:
    """Every model's flags through its script's own checks (the config class's model/router checks among
    them), so a bad value stops the study before its first stage, not at the stage that uses it."""
    pretrain = study.get("pretrain", {})
    for name, options in pretrain.get("models", {}).items():
        flags = {**pretrain.get("common", {}), **pretrain.get("tokenizer", {}), **options}
        if "init_discriminator_from" not in flags:  # a continued model's architecture is its source's
            problem = script_error(TRAINER, to_flags(flags)) or model_config_error(to_flags(flags))
            if problem:
                raise ConfigError(f"'pretrain.models.{name}': {problem}")
    for name, options in study.get("convert", {}).get("models", {}).items():
        converter = importlib.import_module(Path(CONVERTER).stem)
        args = converter.parse_args(["--bert_path", "-", "--output_dir", "-", *to_flags(options)])
        try:
            converter.check_moe_flags(args)
        except ValueError as error:
            raise ConfigError(f"'convert.models.{name}': {error}") from None


def script_error(script: str, argv: list[str]) -> str | None:
    """The one-line error a script's `parse_args(argv)` reports (without its usage text), or None."""
    module = importlib.import_module(Path(script).stem)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            module.parse_args(argv)
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines() or ["rejected its flags"]
        return lines[-1].split(": error: ", 1)[-1]
    return None


def load_study(path: Path) -> dict[str, Any]:
    """Read and validate a study config; a ConfigError names the file."""
    if not path.is_file():
        raise ConfigError(f"study config {path} not found")
    try:
        study = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    try:
        validate_study(study)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return study


# ----------------------------------------------------------------------------------------------------------
# What the config maps onto: a stage's command line and the fine-tuned models
# ----------------------------------------------------------------------------------------------------------


def to_flags(options: dict[str, Any]) -> list[str]:
    """`{"num_experts": 4, "generator_moe": true, "task_name": ["rte", "wnli"]}` -> command-line flags."""
    flags: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is True:
            continue
        flags += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return flags


def glue_runs(glue: dict, models: list[str]) -> list[tuple[str, str, bool, int | None]]:
    """(label, model, random_init, pretraining step) of every fine-tuned model: `glue.models` (default: all of
    `models`), a random-init copy `<name>_random_init` of each `glue.random_init_baselines` model, and
    `<name>_step<N>` for the pretraining checkpoint of each `glue.checkpoint_steps` step (learning curves)."""
    names = glue.get("models", models)
    runs = [(name, name, False, None) for name in names]
    runs += [(f"{name}_random_init", name, True, None) for name in glue.get("random_init_baselines", [])]
    return runs + [
        (f"{name}_step{step}", name, False, step)
        for name in names
        for step in glue.get("checkpoint_steps", [])
    ]
