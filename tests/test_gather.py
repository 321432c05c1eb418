"""gather_glue_results.py on a synthetic results tree with hand-computed scores."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

import gather_glue_results
from glue_results_fixture import make_results_tree


@pytest.fixture
def tree(tmp_path):
    return make_results_tree(tmp_path / "results")


def summary_by_model(path):
    return pd.read_csv(path).set_index("model")


def markdown_rows(table: str) -> list[list[str]]:
    """The cells of a printed markdown table, header first (the separator line dropped)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return [rows[0], *rows[2:]]


def markdown_row(table: str, model: str) -> list[str]:
    return next(row for row in markdown_rows(table) if row[0] == model)


def test_summary_and_long_tables(tree, capsys):
    assert gather_glue_results.main([str(tree)]) == 0
    summary = summary_by_model(tree / "glue_results_summary.csv")
    dense = summary.loc["dense"]
    # CoLA seeds 1 and 2: MCC 0.21 and 0.22 -> 21.5 +- 0.707 points
    assert (dense["cola_mean"], dense["cola_n"]) == (pytest.approx(21.5), 2)
    assert dense["cola_std"] == pytest.approx(math.sqrt(0.5))
    # MRPC score = mean(F1, accuracy) = mean(0.75 + 0.05, 0.75 - 0.05) for seed 2 ...
    assert dense["mrpc_mean"] == pytest.approx(71.5)
    assert dense["mnli_mean"] == pytest.approx(66.5)
    # GLUE over 8 tasks (no WNLI): 51.5 + 100 * mean(task offsets) = 51.5 + 13.5
    assert dense["glue_score"] == pytest.approx(65.0)
    assert (dense["num_experts"], dense["top_k"], dense["model_size"], dense["dense"]) == (1, 1, "tiny", True)
    moe = summary.loc["moe4_top2"]
    assert (moe["num_experts"], moe["top_k"], moe["dense"]) == (4, 2, False)
    assert moe["glue_score"] == pytest.approx(68.0)
    capped = summary.loc["moe8_top2_cap1.25"]
    assert (capped["capacity_factor"], capped["model_size"]) == (1.25, "tiny")

    partial = summary.loc["moe8_top1_partial"]
    assert math.isnan(partial["glue_score"])
    assert partial["glue_tasks_missing"] == "mrpc stsb qqp mnli qnli"
    assert partial["mrpc_n"] == 0 and math.isnan(partial["mrpc_mean"])

    legacy = summary.loc["original_study_4experts"]
    assert (legacy["rte_mean"], legacy["rte_n"], legacy["num_experts"], legacy["top_k"]) == (60.0, 1, 4, 2)
    assert math.isnan(legacy["rte_std"])

    long = pd.read_csv(tree / "glue_results_long.csv")
    assert len(long) == 4 * 2 * 13 + 4 * 2 + 2
    assert set(long["metric"]) == {
        "matthews_correlation",
        "accuracy",
        "f1",
        "pearson",
        "spearmanr",
        "accuracy_mm",
    }
    row = long[
        (long.model == "dense") & (long.task == "stsb") & (long.seed == 1) & (long.metric == "pearson")
    ]
    assert row["value"].item() == pytest.approx(0.5 + 0.25 + 0.01 + 0.05)
    assert long[long.model == "original_study_4experts"]["seed"].isna().all()

    table = capsys.readouterr().out
    assert markdown_row(table, "dense")[:6] == ["dense", "tiny", "1", "1", "-", "21.5 ± 0.7 (2)"]
    assert markdown_row(table, "moe4_top1")[:5] == ["moe4_top1", "tiny", "4", "1", "dropless"]
    assert markdown_row(table, "moe8_top2_cap1.25")[4] == "1.25"
    assert markdown_row(table, "moe8_top1_partial").count("missing") == 6  # five tasks and the GLUE score
    assert markdown_row(table, "original_study_4experts")[:5] == [
        "original_study_4experts",
        "?",
        "4",
        "2",
        "dropless",
    ]
    # The legacy model has SST-2 and RTE only: those are the tasks every model shares.
    dense = summary.loc["dense"]
    assert dense["common_tasks"] == "sst2 rte"
    assert dense["common_score"] == pytest.approx((dense["sst2_mean"] + dense["rte_mean"]) / 2)
    assert markdown_rows(table)[0][-2:] == ["GLUE (8 tasks)", "mean (sst2 rte)"]
    assert markdown_row(table, "dense")[-2:] == ["65.0", f"{dense['common_score']:.1f}"]


def test_table_shows_only_the_tasks_run_and_their_common_mean(tree, capsys):
    """A mini-study runs four tasks: the table drops the other five and averages CoLA, SST-2 and RTE."""
    for model_dir in tree.iterdir():
        for task_dir in filter(Path.is_dir, model_dir.iterdir()):
            if task_dir.name not in ("cola", "sst2", "rte", "wnli"):
                for path in sorted(task_dir.rglob("*"), reverse=True):
                    path.unlink() if path.is_file() else path.rmdir()
                task_dir.rmdir()
    assert gather_glue_results.main([str(tree)]) == 0
    summary = summary_by_model(tree / "glue_results_summary.csv")
    table = capsys.readouterr().out
    header = markdown_rows(table)[0]
    assert "mrpc" not in header and "GLUE (8 tasks)" not in header
    assert header[5:9] == ["cola", "sst2", "rte", "wnli"]
    partial = summary.loc["moe8_top1_partial"]
    assert partial["common_tasks"] == "sst2 rte"  # the legacy model has no CoLA
    shutil.rmtree(tree / "original_study_4experts")
    assert gather_glue_results.main([str(tree)]) == 0
    summary = summary_by_model(tree / "glue_results_summary.csv")
    dense = summary.loc["dense"]
    assert dense["common_tasks"] == "cola sst2 rte"
    expected = (dense["cola_mean"] + dense["sst2_mean"] + dense["rte_mean"]) / 3
    assert dense["common_score"] == pytest.approx(expected)
    assert markdown_rows(capsys.readouterr().out)[1][-1] == f"{expected:.1f}"


def test_include_wnli_and_latex(tree, capsys):
    assert gather_glue_results.main([str(tree), "--include_wnli", "--format", "latex"]) == 0
    summary = summary_by_model(tree / "glue_results_summary.csv")
    assert summary.loc["dense", "glue_score"] == pytest.approx(51.5 + 100 * 0.98 / 9)
    assert summary.loc["dense", "glue_tasks"] == 9
    latex = capsys.readouterr().out
    assert latex.startswith(r"\begin{tabular}") and r"\toprule" in latex and r"\end{tabular}" in latex
    assert r"21.5 $\pm$ 0.7 (2)" in latex
    assert r"moe8\_top2\_cap1.25" in latex and "GLUE (9 tasks)" in latex


def test_corrupt_and_partial_files_are_reported_and_skipped(tree, caplog):
    corrupt = tree / "moe4_top2" / "rte" / "seed_3" / "eval_results.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"eval_accuracy": 0.7')
    partial = tree / "moe4_top2" / "mnli" / "seed_3" / "eval_results.json"
    partial.parent.mkdir()
    partial.write_text(json.dumps({"eval_accuracy": 0.7, "eval_loss": 0.5}))
    nan = tree / "dense" / "cola" / "seed_3" / "eval_results.json"
    nan.parent.mkdir()
    nan.write_text('{"eval_matthews_correlation": NaN}')
    leftover = tree / "dense" / "cola" / ".seed_4.tmp-123" / "eval_results.json"
    leftover.parent.mkdir()
    leftover.write_text("{")

    assert gather_glue_results.main([str(tree)]) == gather_glue_results.EXIT_PROBLEMS
    for path in (corrupt, partial, nan):
        assert str(path) in caplog.text
    assert "eval_accuracy_mm" in caplog.text
    assert str(leftover) not in caplog.text, "unfinished run_glue temp dirs are not results"
    summary = summary_by_model(tree / "glue_results_summary.csv")
    assert summary.loc["moe4_top2", "rte_n"] == 2 and summary.loc["moe4_top2", "mnli_n"] == 2
    assert summary.loc["dense", "cola_n"] == 2


def test_corrupt_config_is_reported(tree, caplog):
    config = tree / "moe4_top1" / "sst2" / "seed_1" / "config.json"
    config.write_text("not json")
    assert gather_glue_results.main([str(tree)]) == gather_glue_results.EXIT_PROBLEMS
    assert str(config) in caplog.text
    assert summary_by_model(tree / "glue_results_summary.csv").loc["moe4_top1", "sst2_n"] == 1


def test_empty_tree_is_an_error(tmp_path, caplog):
    assert gather_glue_results.main([str(tmp_path)]) == gather_glue_results.EXIT_NO_RESULTS
    assert "no usable eval_results.json" in caplog.text
    assert not (tmp_path / "glue_results_summary.csv").exists()
