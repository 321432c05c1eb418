"""Collect GLUE results from a run_glue.py output tree into a long CSV, a summary CSV and a printed table.

    python gather_glue_results.py outputs/glue --format markdown

Reads `<root>/<model>/<task>/seed_<seed>/eval_results.json` (run_glue.py's layout) and the original
study's `<root>/<config>/<task>/eval_results.json`, each with the model config saved beside it
(`config.json`: experts, active experts, capacity factor, model size).

- Long CSV: one row per model, task, seed and metric, values as run_glue.py wrote them (0-1).
- Summary CSV: one row per model; for every task the mean and sample std over seeds of the task score
  (mean of its metrics: MRPC/QQP F1 and accuracy, STS-B Pearson and Spearman, MNLI matched and
  mismatched), in GLUE points (x100), the seed count, and the GLUE score = mean of the task means over
  the 8 tasks without WNLI, as BERT and ELECTRA report (`--include_wnli` for 9). A model missing a
  task has no GLUE score; the missing tasks are listed, never averaged over. `common_score` is the mean
  over the score tasks every model in the table has (`common_tasks`), for studies that run a few tasks.
- Printed table: the tasks that have results, the GLUE score when some model has one, and, when some
  model has none, that common mean.

Corrupt or partial result files are reported by path and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from glue_tasks import GLUE_SCORE_TASKS, GLUE_TASKS, RESULTS_FILE, eval_metric_keys, task_score
from modeling_electra_config import PRESETS, preset_name
from outputs import TABLE_FORMATS, render_table, write_atomically

logger = logging.getLogger("gather_glue_results")

CONFIG_FILE = "config.json"
LONG_CSV = "glue_results_long.csv"
SUMMARY_CSV = "glue_results_summary.csv"
SEED_DIR = re.compile(r"seed_(-?\d+)")
# GLUE reports scores in points.
SCORE_SCALE = 100.0
# Tables list models from the smallest preset to the largest.
SIZE_ORDER = list(PRESETS)
CONFIG_COLUMNS = ["model_size", "num_experts", "top_k", "capacity_factor"]
MISSING = "missing"
EXIT_PROBLEMS = 1
EXIT_NO_RESULTS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "results_dir", type=Path, help="run_glue.py --output_dir (or one model's folder in it)"
    )
    parser.add_argument("--output_long", type=Path, help=f"long CSV (default: <results_dir>/{LONG_CSV})")
    parser.add_argument(
        "--output_summary", type=Path, help=f"summary CSV (default: <results_dir>/{SUMMARY_CSV})"
    )
    parser.add_argument("--format", choices=TABLE_FORMATS, default="markdown", help="printed table")
    parser.add_argument("--include_wnli", action="store_true", help="GLUE score over 9 tasks instead of 8")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"results_dir {args.results_dir} is not a directory")
    args.output_long = args.output_long or args.results_dir / LONG_CSV
    args.output_summary = args.output_summary or args.results_dir / SUMMARY_CSV
    return args


@dataclass
class RunResult:
    model: str
    task: str
    seed: int | None
    metrics: dict[str, float]
    config: dict[str, Any]
    path: Path


class ResultError(ValueError):
    """A result or config file that cannot be used (unreadable, not JSON, missing metrics)."""


def locate(root: Path, results_file: Path) -> tuple[str, str, int | None] | None:
    """(model, task, seed) from a results path; None when it is in neither known layout."""
    run_dir = results_file.parent
    seed_match = SEED_DIR.fullmatch(run_dir.name)
    if seed_match and run_dir.parent.name in GLUE_TASKS:
        task_dir, seed = run_dir.parent, int(seed_match.group(1))
    elif run_dir.name in GLUE_TASKS:
        task_dir, seed = run_dir, None
    else:
        return None
    model_dir = task_dir.parent
    model = model_dir.relative_to(root).as_posix() if model_dir != root else root.resolve().name
    return model, task_dir.name, seed


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultError(f"{path}: unreadable ({error})") from error
    if not isinstance(data, dict):
        raise ResultError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_metrics(path: Path, task: str) -> dict[str, float]:
    data = read_json(path)
    wanted = eval_metric_keys(task)
    missing = [key for key in wanted if key not in data]
    if missing:
        raise ResultError(f"{path}: partial results, no {missing} for {task}")
    bad = [key for key in wanted if not isinstance(data[key], (int, float)) or not math.isfinite(data[key])]
    if bad:
        raise ResultError(f"{path}: non-numeric or non-finite {bad}")
    return {key: float(data[key]) for key in wanted}


def model_size(config: dict[str, Any]) -> str | None:
    if config.get("model_size"):
        return str(config["model_size"])
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if hidden is None or layers is None:
        return None
    return preset_name(hidden, layers) or f"h{hidden}-l{layers}"


def read_run_config(results_file: Path, root: Path) -> dict[str, Any]:
    """Experts, active experts, capacity and size from the model config saved with the run.

    run_glue.py saves it in the run dir; the original study's layout may hold it in the task or
    configuration folder. A plain ELECTRA config (no MoE fields) is the dense model: 1 expert, top-1.
    """
    directory = results_file.parent
    candidates = []
    while directory != root.parent and len(candidates) < 3:
        candidates.append(directory / CONFIG_FILE)
        if directory == root:
            break
        directory = directory.parent
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        logger.warning("%s: no %s beside it; experts and size unknown", results_file, CONFIG_FILE)
        return dict.fromkeys(CONFIG_COLUMNS)
    config = read_json(path)
    if config.get("model_type") == "electra_moe" and "num_experts" not in config:
        raise ResultError(f"{path}: electra_moe config without num_experts")
    num_experts = int(config.get("num_experts", 1))
    return {
        "model_size": model_size(config),
        "num_experts": num_experts,
        "top_k": int(config.get("top_k", 1)) if num_experts > 1 else 1,
        "capacity_factor": config.get("capacity_factor") if num_experts > 1 else None,
    }


def collect(root: Path) -> tuple[list[RunResult], list[str]]:
    """All usable runs under `root`, and one message per file that was skipped."""
    results: list[RunResult] = []
    problems: list[str] = []
    seen: dict[tuple[str, str, int | None], Path] = {}
    for path in sorted(root.rglob(RESULTS_FILE)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # run_glue.py's unfinished temporary dirs
        location = locate(root, path)
        if location is None:
            logger.warning(
                "%s: not in a known layout (<model>/<task>/seed_<n>/ or <config>/<task>/); ignored", path
            )
            continue
        model, task, seed = location
        if location in seen:
            problems.append(f"{path}: duplicate of {seen[location]} (same model, task and seed)")
            continue
        try:
            metrics = read_metrics(path, task)
            config = read_run_config(path, root)
        except ResultError as error:
            problems.append(str(error))
            continue
        seen[location] = path
        results.append(RunResult(model, task, seed, metrics, config, path))
    return results, problems


def long_table(results: list[RunResult]) -> pd.DataFrame:
    rows = [
        {
            "model": r.model,
            "task": r.task,
            "seed": r.seed,
            "metric": key.removeprefix("eval_"),
            "value": value,
            **r.config,
            "path": str(r.path),
        }
        for r in results
        for key, value in r.metrics.items()
    ]
    columns = ["model", "task", "seed", "metric", "value", *CONFIG_COLUMNS, "path"]
    return pd.DataFrame(rows, columns=columns).astype({"seed": "Int64"})


def summary_table(results: list[RunResult], include_wnli: bool = False) -> pd.DataFrame:
    """One row per model: config, per-task mean/std/n of the task score (x100), GLUE score."""
    score_tasks = GLUE_TASKS if include_wnli else GLUE_SCORE_TASKS
    by_model: dict[str, list[RunResult]] = {}
    for result in results:
        by_model.setdefault(result.model, []).append(result)
    rows = []
    for model, runs in by_model.items():
        configs = {tuple(sorted(r.config.items(), key=str)) for r in runs}
        if len(configs) > 1:
            logger.warning("%s: runs disagree on the model config %s; using the first", model, configs)
        row: dict[str, Any] = {"model": model, **runs[0].config}
        row["dense"] = None if row["num_experts"] is None else row["num_experts"] == 1
        for task in GLUE_TASKS:
            scores = [SCORE_SCALE * task_score(task, r.metrics) for r in runs if r.task == task]
            row[f"{task}_mean"] = float(np.mean(scores)) if scores else math.nan
            row[f"{task}_std"] = float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan
            row[f"{task}_n"] = len(scores)
        missing = [task for task in score_tasks if row[f"{task}_n"] == 0]
        row["glue_score"] = math.nan if missing else float(np.mean([row[f"{t}_mean"] for t in score_tasks]))
        row["glue_tasks"] = len(score_tasks)
        row["glue_tasks_missing"] = " ".join(missing)
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    # A study that runs only some tasks (the mini-study: CoLA, SST-2, RTE, WNLI) has no GLUE score; its
    # models are compared on the mean over the score tasks that every model has.
    common = [t for t in score_tasks if (summary[f"{t}_n"] > 0).all()]
    summary["common_tasks"] = " ".join(common)
    summary["common_score"] = summary[[f"{t}_mean" for t in common]].mean(axis=1) if common else math.nan
    size_rank = summary["model_size"].map(
        lambda s: SIZE_ORDER.index(s) if s in SIZE_ORDER else len(SIZE_ORDER)
    )
    summary = summary.assign(_size=size_rank).sort_values(
        ["_size", "model_size", "num_experts", "top_k", "capacity_factor", "model"], na_position="last"
    )
    return summary.drop(columns="_size").reset_index(drop=True)


def format_cell(mean: float, std: float, n: int, latex: bool) -> str:
    if n == 0 or math.isnan(mean):
        return MISSING
    pm = r" $\pm$ " if latex else " ± "
    return f"{mean:.1f}{pm}{std:.1f} ({n})" if n > 1 else f"{mean:.1f} ({n})"


def format_value(value: Any, default: str = "?") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return f"{value:g}" if isinstance(value, float) else str(value)


def capacity_default(num_experts: Any) -> str:
    """What an empty capacity factor means: no MoE (dense), no token dropping (MoE), or an unknown config."""
    if pd.isna(num_experts):
        return "?"
    return "-" if num_experts == 1 else "dropless"


def summary_cells(summary: pd.DataFrame, fmt: str, include_wnli: bool = False) -> pd.DataFrame:
    """The printed table's cells: config, mean ± std (seeds) per task run, GLUE score, common mean."""
    latex = fmt == "latex"
    tasks = [t for t in GLUE_TASKS if (summary[f"{t}_n"] > 0).any()]
    # Without a GLUE score for every model, also show the mean over the tasks all of them have.
    common = summary["glue_score"].isna().any() and summary["common_tasks"].iloc[0]
    any_glue = summary["glue_score"].notna().any()
    escape = str.maketrans({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#"}) if latex else {}
    table = pd.DataFrame(
        {
            "model": [str(m).translate(escape) for m in summary["model"]],
            "size": summary["model_size"].map(format_value),
            "experts": summary["num_experts"].map(format_value),
            "top-k": summary["top_k"].map(format_value),
            "capacity": [
                format_value(cap, default=capacity_default(n))
                for cap, n in zip(summary["capacity_factor"], summary["num_experts"], strict=True)
            ],
        }
    )
    for task in tasks:
        table[task] = [
            format_cell(row[f"{task}_mean"], row[f"{task}_std"], int(row[f"{task}_n"]), latex)
            for _, row in summary.iterrows()
        ]
    if any_glue:
        glue = summary["glue_score"].map(lambda v: MISSING if math.isnan(v) else f"{v:.1f}")
        table[f"GLUE ({9 if include_wnli else 8} tasks)"] = glue
    if common:
        table[f"mean ({common})"] = summary["common_score"].map(lambda v: f"{v:.1f}")
    return table


def format_table(summary: pd.DataFrame, fmt: str, include_wnli: bool = False) -> str:
    """The summary as a markdown or LaTeX (booktabs) table."""
    table = summary_cells(summary, fmt, include_wnli)
    # Markdown: numbers keep the precision they were formatted with (capacity as given, scores to 0.1).
    floatfmt = ["g"] * 5 + [".1f"] * (table.shape[1] - 5) if fmt == "markdown" else None
    return render_table(table, fmt, floatfmt=floatfmt)


def write_csv_atomically(frame: pd.DataFrame, path: Path) -> None:
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    results, problems = collect(args.results_dir)
    for problem in problems:
        logger.error("skipped %s", problem)
    if not results:
        logger.error("no usable %s found under %s", RESULTS_FILE, args.results_dir)
        return EXIT_NO_RESULTS

    summary = summary_table(results, args.include_wnli)
    write_csv_atomically(long_table(results), args.output_long)
    write_csv_atomically(summary, args.output_summary)
    print(format_table(summary, args.format, args.include_wnli))
    logger.info(
        "%d runs of %d models -> %s, %s", len(results), len(summary), args.output_long, args.output_summary
    )
    if problems:
        logger.error("%d result file(s) skipped (listed above)", len(problems))
        return EXIT_PROBLEMS
    return 0


if __name__ == "__main__":
    sys.exit(main())
