"""Collect GLUE results from a run_glue.py output tree into a long CSV, a summary CSV and a printed table.

    python gather_glue_results.py outputs/glue --format markdown

Reads `<root>/<model>/<task>/seed_<seed>/eval_results.json` (run_glue.py's layout) and the original
study's `<root>/<config>/<task>/eval_results.json`, each with the model config saved beside it
(`config.json`: experts, active experts, capacity factor, model size).

A task's score comes in two conventions (glue_tasks.SCORE_CONVENTIONS), both reported and named:
the GLUE leaderboard's (the mean of the task's metrics: MRPC/QQP F1 and accuracy, STS-B Pearson and
Spearman, MNLI matched and mismatched) and the ELECTRA paper's (CoLA MCC, STS-B Spearman, accuracy
for the rest, MNLI matched).

- Long CSV: one row per model, task, seed and metric, values as run_glue.py wrote them (0-1).
- Scores CSV: one row per model, task and seed: the task score in each convention, in GLUE points.
- Summary CSV: one row per model; for every task the mean, sample std, seed count and 95% confidence
  interval (Student t over seeds) of the task score in GLUE points (x100); the GLUE score = mean of the
  task means over the 8 tasks without WNLI, which BERT and ELECTRA leave out (`--include_wnli` for 9).
  Leaderboard columns are `<task>_mean`, `glue_score`, ...; the ELECTRA paper's are `electra_<task>_mean`,
  `electra_glue_score`, ... A model missing a task has no GLUE score; the missing tasks are listed, never
  averaged over. `common_score` is the mean over the score tasks every model in the table has
  (`common_tasks`), for studies that run a few tasks. With `--baseline MODEL`: `<task>_diff`, its 95% CI
  (`_diff_ci95_low/high`), the paired t-test p-value (`_diff_p`) and the pair count (`_diff_n`), the
  differences of each model to MODEL over the seeds both ran.
- Printed tables, one per convention (and per convention the paired differences with `--baseline`): the
  tasks that have results, the GLUE score when some model has one, and, when some model has none, that
  common mean.

Corrupt or partial result files are reported by path and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from glue_tasks import (
    GLUE_SCORE_TASKS,
    GLUE_TASKS,
    RESULTS_FILE,
    SCORE_CONVENTIONS,
    eval_metric_keys,
    task_score,
)
from input_checks import EXIT_BAD_INPUT, unstated_moe_fields
from modeling_electra_config import PRESETS, preset_name
from outputs import TABLE_FORMATS, render_table, write_atomically

logger = logging.getLogger("gather_glue_results")

CONFIG_FILE = "config.json"
LONG_CSV = "glue_results_long.csv"
SUMMARY_CSV = "glue_results_summary.csv"
SCORES_CSV = "glue_results_scores.csv"
CONFIDENCE = 0.95
# Summary column prefix of each score convention; the GLUE leaderboard's keeps the unprefixed names.
CONVENTION_PREFIX = {"glue": "", "electra": "electra_"}
SEED_DIR = re.compile(r"seed_(-?\d+)")
# GLUE reports scores in points.
SCORE_SCALE = 100.0
# Tables list models from the smallest preset to the largest.
SIZE_ORDER = list(PRESETS)
CONFIG_COLUMNS = ["model_size", "num_experts", "top_k", "capacity_factor", "router_type"]
MISSING = "missing"
EXPERT_CHOICE = "expert_choice"
EXIT_PROBLEMS = 1


def build_argument_parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--output_scores", type=Path, help=f"per-run task scores CSV (default: <results_dir>/{SCORES_CSV})"
    )
    parser.add_argument("--format", choices=TABLE_FORMATS, default="markdown", help="printed table")
    parser.add_argument("--include_wnli", action="store_true", help="GLUE score over 9 tasks instead of 8")
    parser.add_argument(
        "--baseline",
        metavar="MODEL",
        help="also report every model's paired difference to this model over the seeds both ran",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"results_dir {args.results_dir} is not a directory")
    args.output_long = args.output_long or args.results_dir / LONG_CSV
    args.output_summary = args.output_summary or args.results_dir / SUMMARY_CSV
    args.output_scores = args.output_scores or args.results_dir / SCORES_CSV
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
    """Experts, active experts, capacity, router and size from the model config saved with the run.

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
    unstated = unstated_moe_fields(config)
    if unstated:
        raise ResultError(f"{path}: electra_moe config without {', '.join(unstated)}")
    num_experts = int(config.get("num_experts", 1))
    return {
        "model_size": model_size(config),
        "num_experts": num_experts,
        "top_k": int(config.get("top_k", 1)) if num_experts > 1 else 1,
        "capacity_factor": config.get("capacity_factor") if num_experts > 1 else None,
        "router_type": config.get("router_type", "softmax_topk") if num_experts > 1 else None,
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


def scores_table(results: list[RunResult]) -> pd.DataFrame:
    """One row per run: model, task, seed and its task score in each convention, in GLUE points."""
    score_columns = [f"{convention}_score" for convention in SCORE_CONVENTIONS]
    rows = [
        {
            "model": r.model,
            "task": r.task,
            "seed": r.seed,
            **{f"{c}_score": SCORE_SCALE * task_score(r.task, r.metrics, c) for c in SCORE_CONVENTIONS},
        }
        for r in results
    ]
    return pd.DataFrame(rows, columns=["model", "task", "seed", *score_columns]).astype({"seed": "Int64"})


def interval(values: Any) -> dict[str, float]:
    """Mean, sample std, n and the 95% Student-t confidence interval of the mean (NaN below two values)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    result = {"mean": float(values.mean()) if n else math.nan, "std": math.nan, "n": n}
    result["ci95_low"] = result["ci95_high"] = math.nan
    if n > 1:
        std = float(values.std(ddof=1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
        result.update(std=std, ci95_low=result["mean"] - half, ci95_high=result["mean"] + half)
    return result


def paired_difference(scores: pd.Series, baseline: pd.Series) -> dict[str, float]:
    """`scores` minus `baseline` (both indexed by seed) over the seeds both have: the mean difference, its
    95% confidence interval, the paired t-test p-value and the number of pairs."""
    shared = scores.index.dropna().intersection(baseline.index.dropna())
    differences = (scores[shared] - baseline[shared]).to_numpy(dtype=float)
    result = interval(differences)
    p_value = math.nan
    if len(differences) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # identical differences: p is 0 or undefined
            p_value = float(stats.ttest_1samp(differences, 0.0).pvalue)
    return {
        "diff": result["mean"],
        "diff_ci95_low": result["ci95_low"],
        "diff_ci95_high": result["ci95_high"],
        "diff_p": p_value,
        "diff_n": result["n"],
    }


def convention_columns(
    scores: pd.DataFrame,
    baseline: pd.DataFrame | None,
    convention: str,
    score_tasks: tuple[str, ...],
) -> dict[str, float]:
    """One model's summary columns in one score convention (prefixed, except the leaderboard's)."""
    prefix, column, row = CONVENTION_PREFIX[convention], f"{convention}_score", {}
    for task in GLUE_TASKS:
        runs = scores[scores["task"] == task]
        row.update({f"{prefix}{task}_{k}": v for k, v in interval(runs[column]).items()})
        if baseline is not None:
            base = baseline[baseline["task"] == task].set_index("seed")[column]
            difference = paired_difference(runs.set_index("seed")[column], base)
            row.update({f"{prefix}{task}_{k}": v for k, v in difference.items()})
    means = [row[f"{prefix}{t}_mean"] for t in score_tasks]
    row[f"{prefix}glue_score"] = math.nan if any(math.isnan(m) for m in means) else float(np.mean(means))
    return row


def summary_table(
    results: list[RunResult], include_wnli: bool = False, baseline: str | None = None
) -> pd.DataFrame:
    """One row per model: config; per task and score convention the score's mean, std, n and 95% CI over
    seeds (GLUE points) and, with `baseline`, the paired difference to it; the GLUE score."""
    score_tasks = GLUE_TASKS if include_wnli else GLUE_SCORE_TASKS
    scores = scores_table(results)
    baseline_scores = scores[scores["model"] == baseline] if baseline is not None else None
    rows = []
    for model in dict.fromkeys(r.model for r in results):
        runs = [r for r in results if r.model == model]
        configs = {tuple(sorted(r.config.items(), key=str)) for r in runs}
        if len(configs) > 1:
            logger.warning("%s: runs disagree on the model config %s; using the first", model, configs)
        row: dict[str, Any] = {"model": model, **runs[0].config}
        row["dense"] = None if row["num_experts"] is None else row["num_experts"] == 1
        for convention in SCORE_CONVENTIONS:
            row.update(
                convention_columns(scores[scores["model"] == model], baseline_scores, convention, score_tasks)
            )
        row["glue_tasks"] = len(score_tasks)
        row["glue_tasks_missing"] = " ".join(t for t in score_tasks if row[f"{t}_n"] == 0)
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    # A study that runs only some tasks (the mini-study: CoLA, SST-2, RTE, WNLI) has no GLUE score; its
    # models are compared on the mean over the score tasks that every model has.
    common = [t for t in score_tasks if (summary[f"{t}_n"] > 0).all()]
    summary["common_tasks"] = " ".join(common)
    for prefix in CONVENTION_PREFIX.values():
        means = summary[[f"{prefix}{t}_mean" for t in common]]
        summary[f"{prefix}common_score"] = means.mean(axis=1) if common else math.nan
    size_rank = summary["model_size"].map(
        lambda s: SIZE_ORDER.index(s) if s in SIZE_ORDER else len(SIZE_ORDER)
    )
    summary = summary.assign(_size=size_rank).sort_values(
        ["_size", "model_size", "num_experts", "top_k", "capacity_factor", "model"], na_position="last"
    )
    return summary.drop(columns="_size").reset_index(drop=True)


def format_cell(stats_row: dict[str, Any], latex: bool) -> str:
    """`mean ± std [95% CI] (seeds)`; one seed: `mean (1)`."""
    n = int(stats_row["n"])
    if n == 0 or math.isnan(stats_row["mean"]):
        return MISSING
    if n == 1:
        return f"{stats_row['mean']:.1f} (1)"
    pm = r" $\pm$ " if latex else " ± "
    ci = f"[{stats_row['ci95_low']:.1f}, {stats_row['ci95_high']:.1f}]"
    return f"{stats_row['mean']:.1f}{pm}{stats_row['std']:.1f} {ci} ({n})"


def format_difference(stats_row: dict[str, Any]) -> str:
    """`+diff [95% CI] p=... (pairs)`; a missing task or no shared seed is `missing`."""
    n = int(stats_row["diff_n"]) if not pd.isna(stats_row["diff_n"]) else 0
    if n == 0:
        return MISSING
    if n == 1:
        return f"{stats_row['diff']:+.1f} (1)"
    ci = f"[{stats_row['diff_ci95_low']:+.1f}, {stats_row['diff_ci95_high']:+.1f}]"
    return f"{stats_row['diff']:+.1f} {ci} p={stats_row['diff_p']:.2g} ({n})"


def format_value(value: Any, default: str = "?") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return f"{value:g}" if isinstance(value, float) else str(value)


def capacity_default(num_experts: Any) -> str:
    """What an empty capacity factor means: no MoE (dense), no token dropping (MoE), or an unknown config."""
    if pd.isna(num_experts):
        return "?"
    return "-" if num_experts == 1 else "dropless"


def task_stats(row: pd.Series, prefix: str, task: str, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: row[f"{prefix}{task}_{key}"] for key in keys}


def config_cells(summary: pd.DataFrame, latex: bool) -> pd.DataFrame:
    escape = str.maketrans({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#"}) if latex else {}
    return pd.DataFrame(
        {
            "model": [str(m).translate(escape) for m in summary["model"]],
            "size": summary["model_size"].map(format_value),
            "experts": summary["num_experts"].map(format_value),
            # Expert choice has no top-k (each expert picks its tokens): its capacity factor sets the compute.
            "top-k": [
                "EC" if router == EXPERT_CHOICE else format_value(k)
                for k, router in zip(summary["top_k"], summary["router_type"], strict=True)
            ],
            "capacity": [
                format_value(cap, default=capacity_default(n))
                for cap, n in zip(summary["capacity_factor"], summary["num_experts"], strict=True)
            ],
        }
    )


def summary_cells(
    summary: pd.DataFrame, fmt: str, include_wnli: bool = False, convention: str = "glue"
) -> pd.DataFrame:
    """The printed table's cells: config, mean ± std [CI] (seeds) per task run, GLUE score, common mean."""
    prefix = CONVENTION_PREFIX[convention]
    tasks = [t for t in GLUE_TASKS if (summary[f"{t}_n"] > 0).any()]
    # Without a GLUE score for every model, also show the mean over the tasks all of them have.
    common = summary["glue_score"].isna().any() and summary["common_tasks"].iloc[0]
    table = config_cells(summary, fmt == "latex")
    keys = ("mean", "std", "n", "ci95_low", "ci95_high")
    for task in tasks:
        table[task] = [
            format_cell(task_stats(row, prefix, task, keys), fmt == "latex") for _, row in summary.iterrows()
        ]
    if summary["glue_score"].notna().any():
        glue = summary[f"{prefix}glue_score"].map(lambda v: MISSING if math.isnan(v) else f"{v:.1f}")
        table[f"GLUE ({9 if include_wnli else 8} tasks)"] = glue
    if common:
        table[f"mean ({common})"] = summary[f"{prefix}common_score"].map(lambda v: f"{v:.1f}")
    return table


def difference_cells(summary: pd.DataFrame, baseline: str, fmt: str, convention: str) -> pd.DataFrame:
    """Every model but the baseline: per task run, the paired difference to the baseline."""
    prefix = CONVENTION_PREFIX[convention]
    others = summary[summary["model"] != baseline].reset_index(drop=True)
    table = config_cells(others, fmt == "latex")
    keys = ("diff", "diff_ci95_low", "diff_ci95_high", "diff_p", "diff_n")
    for task in [t for t in GLUE_TASKS if (summary[f"{t}_n"] > 0).any()]:
        table[task] = [format_difference(task_stats(row, prefix, task, keys)) for _, row in others.iterrows()]
    return table


def format_table(table: pd.DataFrame, fmt: str, title: str) -> str:
    """A titled markdown or LaTeX (booktabs) table."""
    # Markdown: numbers keep the precision they were formatted with (capacity as given, scores to 0.1).
    floatfmt = ["g"] * 5 + [".1f"] * (table.shape[1] - 5) if fmt == "markdown" else None
    heading = f"% {title}" if fmt == "latex" else f"**{title}**"
    return f"{heading}\n\n{render_table(table, fmt, floatfmt=floatfmt)}\n"


def format_tables(
    summary: pd.DataFrame, fmt: str, include_wnli: bool = False, baseline: str | None = None
) -> str:
    """The summary in each score convention, each named; with a baseline, the paired differences too."""
    tables = []
    for convention, description in SCORE_CONVENTIONS.items():
        title = f"{description}. GLUE points: mean ± std [95% CI] (seeds)"
        tables.append(format_table(summary_cells(summary, fmt, include_wnli, convention), fmt, title))
        if baseline is not None:
            title = (
                f"{description}. Paired difference to {baseline} over shared seeds: "
                "mean [95% CI] p (paired t-test) (pairs)"
            )
            tables.append(format_table(difference_cells(summary, baseline, fmt, convention), fmt, title))
    return "\n".join(tables)


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
        return EXIT_BAD_INPUT
    models = sorted({r.model for r in results})
    if args.baseline is not None and args.baseline not in models:
        logger.error("--baseline %s: no such model under %s; the models are %s", args.baseline,
                     args.results_dir, models)  # fmt: skip
        return EXIT_BAD_INPUT

    summary = summary_table(results, args.include_wnli, args.baseline)
    write_csv_atomically(long_table(results), args.output_long)
    write_csv_atomically(scores_table(results), args.output_scores)
    write_csv_atomically(summary, args.output_summary)
    print(format_tables(summary, args.format, args.include_wnli, args.baseline))
    logger.info(
        "%d runs of %d models -> %s, %s, %s",
        len(results),
        len(summary),
        args.output_long,
        args.output_scores,
        args.output_summary,
    )
    if problems:
        logger.error("%d result file(s) skipped (listed above)", len(problems))
        return EXIT_PROBLEMS
    return 0


if __name__ == "__main__":
    sys.exit(main())
