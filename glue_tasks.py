"""GLUE task definitions, data readers and metrics shared by `run_glue.py` and `gather_glue_results.py`.

Every source (the Hub's `nyu-mll/glue`, the original GLUE download, user csv/tsv/json files) is turned
into the Hub's schema: the Hub's text column names, `label` with the Hub's label ids (-1 for unlabeled
test rows) and `idx`, so a model fine-tuned on one source predicts the same ids as on any other.
Metrics are computed here with scikit-learn/scipy because `evaluate`'s GLUE metric scripts live on
the Hub, which cannot be reached offline.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

logger = logging.getLogger(__name__)

# Hub label id of unlabeled (test) rows.
NO_LABEL = -1

MNLI_LABELS = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: Hub schema, original file layout, metrics and submission file names.

    `original_columns` maps each Hub column (text columns, `label`, `idx`) to its header name in the
    original GLUE tsv files; `headerless_columns` names the columns of files that have no header
    (CoLA's train and dev files), keyed by split.
    """

    name: str
    directory: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    original_columns: dict[str, str]
    splits: dict[str, str]
    submission_files: dict[str, str]
    headerless_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Regression targets are divided by this for training (ELECTRA scales STS-B's 0-5 scores to [0, 1]);
    # predictions are multiplied back for metrics and submission files.
    target_scale: float = 1.0
    # ELECTRA's `double_unordered`: the training set also holds every pair in swapped order.
    unordered_pair: bool = False

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def train_split(self) -> str | None:
        return "train" if "train" in self.splits else None

    @property
    def eval_splits(self) -> list[str]:
        """Labeled evaluation splits; MNLI has matched and mismatched."""
        return [s for s in self.splits if s.startswith("validation")]

    @property
    def test_splits(self) -> list[str]:
        return [s for s in self.splits if s.startswith("test")]


def _pair_task(name, directory, text_columns, label_names, metrics, idx="index", label="label", **kw):
    columns = {c: c for c in text_columns} | {"label": label, "idx": idx}
    kw.setdefault("splits", {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"})
    kw.setdefault("submission_files", {"test": f"{directory}.tsv"})
    return GlueTask(
        name, directory, text_columns, label_names, metrics, kw.pop("original_columns", columns), **kw
    )


TASKS: dict[str, GlueTask] = {
    "cola": _pair_task(
        "cola",
        "CoLA",
        ("sentence",),
        ("unacceptable", "acceptable"),
        ("matthews_correlation",),
        headerless_columns={
            "train": ("source", "label", "author_mark", "sentence"),
            "validation": ("source", "label", "author_mark", "sentence"),
        },
    ),
    "sst2": _pair_task("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": _pair_task(
        "mrpc",
        "MRPC",
        ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"),
        ("f1", "accuracy"),
        unordered_pair=True,
        original_columns={
            "sentence1": "#1 String",
            "sentence2": "#2 String",
            "label": "Quality",
            "idx": "index",
        },
    ),
    "stsb": _pair_task(
        "stsb",
        "STS-B",
        ("sentence1", "sentence2"),
        None,
        ("pearson", "spearmanr"),
        label="score",
        target_scale=5.0,
        unordered_pair=True,
    ),
    "qqp": _pair_task(
        "qqp",
        "QQP",
        ("question1", "question2"),
        ("not_duplicate", "duplicate"),
        ("f1", "accuracy"),
        idx="id",
        label="is_duplicate",
    ),
    "mnli": _pair_task(
        "mnli",
        "MNLI",
        ("premise", "hypothesis"),
        MNLI_LABELS,
        ("accuracy",),
        original_columns={
            "premise": "sentence1",
            "hypothesis": "sentence2",
            "label": "gold_label",
            "idx": "index",
        },
        splits={
            "train": "train.tsv",
            "validation_matched": "dev_matched.tsv",
            "validation_mismatched": "dev_mismatched.tsv",
            "test_matched": "test_matched.tsv",
            "test_mismatched": "test_mismatched.tsv",
        },
        submission_files={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
    ),
    "qnli": _pair_task(
        "qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)
    ),
    "rte": _pair_task(
        "rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)
    ),
    "wnli": _pair_task(
        "wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)
    ),
    # The diagnostic set has no labels of its own: it is predicted with an MNLI model.
    "ax": _pair_task(
        "ax",
        "diagnostic",
        ("premise", "hypothesis"),
        MNLI_LABELS,
        (),
        original_columns={"premise": "sentence1", "hypothesis": "sentence2", "idx": "index"},
        splits={"test": "diagnostic.tsv"},
        submission_files={"test": "AX.tsv"},
    ),
}
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
DIAGNOSTIC_TASK = "ax"
# BERT and ELECTRA leave WNLI out of their GLUE dev averages (its dev set is adversarial): 8 tasks.
GLUE_SCORE_TASKS = tuple(t for t in GLUE_TASKS if t != "wnli")
# How a task's metrics make its one score; results tables print both conventions, each named.
SCORE_CONVENTIONS = {
    "glue": "GLUE leaderboard: mean of a task's metrics (MRPC/QQP F1 and accuracy, STS-B Pearson and "
    "Spearman, MNLI matched and mismatched accuracy)",
    "electra": "ELECTRA paper (Clark et al. 2020): CoLA MCC, STS-B Spearman, accuracy for the rest "
    "(MNLI matched)",
}
# The ELECTRA paper's metric where it is not accuracy.
ELECTRA_SCORE_METRIC = {"cola": "matthews_correlation", "stsb": "spearmanr"}
# Suffix transformers' run_glue example gives MNLI mismatched metrics.
MISMATCHED_SUFFIX = "_mm"
# run_glue.py's output layout, read by gather_glue_results.py and `run_study.py --resume`. The results file is
# written last, so its presence marks a finished run.
RESULTS_FILE = "eval_results.json"


def glue_run_dir(output_dir: Path, model_name: str, task_name: str, seed: int) -> Path:
    """`<output_dir>/<model_name>/<task>/seed_<seed>/`: where run_glue.py writes one (task, seed) run."""
    return Path(output_dir) / model_name / task_name / f"seed_{seed}"


def eval_metric_keys(task: str) -> list[str]:
    """The metric keys a finished run's eval_results.json holds for `task` (transformers' naming)."""
    spec = TASKS[task]
    keys = [f"eval_{m}" for m in spec.metrics]
    if task == "mnli":
        keys += [f"eval_{m}{MISMATCHED_SUFFIX}" for m in spec.metrics]
    return keys


@dataclass
class SplitData:
    """Rows of one split in the Hub schema plus the number of malformed rows that were skipped."""

    columns: dict[str, list[Any]]
    num_malformed: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.columns["idx"])


def parse_label(task: GlueTask, value: str | int | float | None) -> int | float:
    """Map a label as written in a file (name, integer id or score) to the Hub's label id.

    Raises ValueError for anything that is not a label of `task`.
    """
    if task.is_regression:
        score = float(value)
        if not math.isfinite(score):
            raise ValueError(f"non-finite score {value!r}")
        return score
    names = task.label_names
    if isinstance(value, str):
        text = value.strip()
        if text in names:
            return names.index(text)
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise ValueError(f"label {value!r} is not one of {list(names)} or an id below {len(names)}")


def _resolve_columns(task: GlueTask, header: list[str], path: Path, labeled: bool) -> dict[str, str]:
    """Find each Hub column in a header, by its Hub name or its original GLUE name."""
    wanted = list(task.text_columns) + (["label"] if labeled else [])
    found: dict[str, str] = {}
    for column in wanted:
        candidates = [column, task.original_columns.get(column, column)]
        match = next((c for c in candidates if c in header), None)
        if match is None:
            raise ValueError(
                f"{path}: column {column!r} (original GLUE name {candidates[1]!r}) not found; the file has "
                f"columns {header}. Check that the file belongs to task {task.name!r}."
            )
        found[column] = match
    for candidate in ("idx", task.original_columns.get("idx", "index")):
        if candidate in header:
            found["idx"] = candidate
            break
    return found


def _rows_to_split(
    task: GlueTask, header: list[str], rows: list[list[Any]], path: Path, labeled: bool, split: str
) -> SplitData:
    columns = _resolve_columns(task, header, path, labeled)
    position = {name: header.index(source) for name, source in columns.items()}
    out: dict[str, list[Any]] = {c: [] for c in (*task.text_columns, "label", "idx")}
    malformed = 0
    for row_number, row in enumerate(rows):
        if len(row) != len(header):
            malformed += 1
            continue
        try:
            label = parse_label(task, row[position["label"]]) if labeled else NO_LABEL
            idx = int(row[position["idx"]]) if "idx" in position else row_number
        except (TypeError, ValueError):
            malformed += 1
            continue
        for column in task.text_columns:
            text = row[position[column]]
            out[column].append("" if text is None else str(text))
        out["label"].append(label)
        out["idx"].append(idx)
    if malformed:
        logger.warning("%s: skipped %d malformed row(s) of %d", path, malformed, len(rows))
    if not out["idx"]:
        raise ValueError(f"{path}: no usable rows for task {task.name!r} split {split!r}")
    return SplitData(out, malformed, str(path))


def read_delimited(
    path: Path, delimiter: str = "\t", headerless_columns: tuple[str, ...] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Read a GLUE tsv (tab-separated, quoting disabled: sentences hold stray quotes) or a csv (comma-separated,
    quoted fields) into a header and rows; an optional BOM and blank lines are skipped."""
    csv.field_size_limit(sys.maxsize)  # the default 128 KiB field limit is not a property of GLUE files
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter=delimiter, quoting=quoting) if row != []]
    if headerless_columns is not None:
        return list(headerless_columns), rows
    if not rows:
        raise ValueError(f"{path}: file is empty (expected a header row)")
    return [name.strip() for name in rows[0]], rows[1:]


def load_glue_dir_split(glue_dir: Path, task_name: str, split: str) -> SplitData:
    """Load one split of one task from the original GLUE distribution (`glue_dir/<Task>/<file>.tsv`)."""
    task = TASKS[task_name]
    if split not in task.splits:
        raise ValueError(f"task {task_name!r} has no split {split!r}; it has {list(task.splits)}")
    path = Path(glue_dir) / task.directory / task.splits[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --glue_dir must point at the GLUE download containing {task.directory}/"
        )
    header, rows = read_delimited(path, headerless_columns=task.headerless_columns.get(split))
    labeled = not split.startswith("test")
    return _rows_to_split(task, header, rows, path, labeled, split)


def read_table(path: Path) -> tuple[list[str], list[list[Any]]]:
    """Read a user-supplied csv, tsv, json list or json-lines file into a header and rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt", ".csv"):
        return read_delimited(path, "," if suffix == ".csv" else "\t")
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8-sig")
        try:
            records = json.loads(text)
            if isinstance(records, dict) and "data" in records:
                records = records["data"]
        except json.JSONDecodeError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: expected a list of objects or one JSON object per line")
        header = list(dict.fromkeys(key for record in records for key in record))
        return header, [[record.get(key) for key in header] for record in records]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl")


def load_file_split(path: Path, task_name: str, split: str, labeled: bool | None = None) -> SplitData:
    """Load a user file whose columns use the Hub's names or the original GLUE names.

    Test files may omit the label column (then every label is -1).
    """
    task = TASKS[task_name]
    header, rows = read_table(path)
    label_column = task.original_columns.get("label", "label")
    if labeled is None:
        labeled = "label" in header or label_column in header
    if not labeled and not split.startswith("test"):
        raise ValueError(
            f"{path}: the {split} file needs a 'label' column (or {label_column!r}); found {header}"
        )
    return _rows_to_split(task, header, rows, Path(path), labeled, split)


def _safe_correlation(function, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Correlation that is 0.0, not NaN, when undefined (constant input or fewer than two points)."""
    if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        value = float(function(predictions, labels)[0])
    return value if math.isfinite(value) else 0.0


def glue_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics with the keys transformers' run_glue example writes (before the `eval_` prefix).

    `predictions` are class ids (classification) or scores (STS-B). Constant predictions give an MCC,
    Pearson and Spearman of 0.0 rather than NaN; tasks with two metrics also get `combined_score`.
    """
    task = TASKS[task_name]
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    if task.is_regression:
        predictions, labels = predictions.astype(np.float64), labels.astype(np.float64)
        result = {
            "pearson": _safe_correlation(stats.pearsonr, predictions, labels),
            "spearmanr": _safe_correlation(stats.spearmanr, predictions, labels),
        }
    else:
        result = {}
        if "matthews_correlation" in task.metrics:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mcc = float(matthews_corrcoef(labels, predictions))
            result["matthews_correlation"] = mcc if math.isfinite(mcc) else 0.0
        if "accuracy" in task.metrics:
            result["accuracy"] = float(accuracy_score(labels, predictions))
        if "f1" in task.metrics:
            result["f1"] = float(f1_score(labels, predictions, pos_label=1, zero_division=0.0))
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def task_score(task_name: str, metrics: dict[str, float], convention: str = "glue") -> float:
    """A task's score in one of `SCORE_CONVENTIONS`: "glue" (the GLUE leaderboard's mean of the task's
    metrics; MNLI: matched and mismatched accuracy) or "electra" (the ELECTRA paper's single metric).

    `metrics` uses eval_results.json keys; raises KeyError naming a missing metric.
    """
    if convention == "electra":
        return float(metrics[f"eval_{ELECTRA_SCORE_METRIC.get(task_name, 'accuracy')}"])
    if convention != "glue":
        raise ValueError(f"score convention must be one of {list(SCORE_CONVENTIONS)}, got {convention!r}")
    return float(np.mean([metrics[key] for key in eval_metric_keys(task_name)]))
