"""gather_glue_results.py on a synthetic results tree with hand-computed scores."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

import gather_glue_results
from glue_results_fixture import eval_results, make_results_tree
from input_checks import EXIT_BAD_INPUT


@pytest.fixture
def tree(tmp_path):
    return make_results_tree(tmp_path / "results")


def summary_by_model(path):
    return pd.read_csv(path).set_index("model")


def markdown_tables(printed: str) -> dict[str, list[list[str]]]:
    """Each printed markdown table by its title: the cells, header first (the separator line dropped)."""
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in printed.splitlines():
        if line.startswith("**"):
            title, tables[line.strip("*")] = line.strip("*"), []
        elif line.startswith("|") and not line.startswith("|:") and not line.startswith("|-"):
            tables[title].append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return tables


def markdown_rows(printed: str, convention: str = "GLUE leaderboard") -> list[list[str]]:
    """The table of one score convention (not the paired differences)."""
    return next(rows for title, rows in markdown_tables(printed).items()
                if title.startswith(convention) and "Paired" not in title)  # fmt: skip


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
    # 95% CI of two seeds 21.5 +- 0.707: t(0.975, 1) = 12.706, half width 12.706 * 0.707 / sqrt(2) = 6.35
    assert markdown_row(table, "dense")[:6] == ["dense", "tiny", "1", "1", "-", "21.5 ± 0.7 [15.1, 27.9] (2)"]
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
    assert latex.startswith("% GLUE leaderboard") and latex.count(r"\begin{tabular}") == 2
    assert "\n% ELECTRA paper" in latex and r"\toprule" in latex and r"\end{tabular}" in latex
    assert r"21.5 $\pm$ 0.7 [15.1, 27.9] (2)" in latex
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
    assert gather_glue_results.main([str(tmp_path)]) == EXIT_BAD_INPUT
    assert "no usable eval_results.json" in caplog.text
    assert not (tmp_path / "glue_results_summary.csv").exists()


def test_both_score_conventions_are_reported_and_named(tree, capsys):
    assert gather_glue_results.main([str(tree)]) == 0
    dense = summary_by_model(tree / "glue_results_summary.csv").loc["dense"]
    # ELECTRA's paper: MRPC accuracy (value - spread), STS-B Spearman (value - spread), MNLI matched (+ spread)
    assert dense["electra_mrpc_mean"] == pytest.approx(dense["mrpc_mean"] - 5)
    assert dense["electra_stsb_mean"] == pytest.approx(dense["stsb_mean"] - 5)
    assert dense["electra_mnli_mean"] == pytest.approx(dense["mnli_mean"] + 5)
    assert dense["electra_cola_mean"] == pytest.approx(dense["cola_mean"])
    assert dense["electra_glue_score"] == pytest.approx(65.0 - 100 * (3 * 0.05 - 0.05) / 8)
    printed = capsys.readouterr().out
    electra = markdown_rows(printed, "ELECTRA paper")
    mrpc = electra[0].index("mrpc")
    assert next(row for row in electra if row[0] == "dense")[mrpc].startswith(
        f"{dense['electra_mrpc_mean']:.1f} ± "
    )
    assert "as BERT and ELECTRA report" not in printed + (gather_glue_results.__doc__ or "")
    scores = pd.read_csv(tree / "glue_results_scores.csv")
    row = scores[(scores.model == "dense") & (scores.task == "mrpc") & (scores.seed == 1)]
    assert (row["glue_score"].item(), row["electra_score"].item()) == (
        pytest.approx(71.0),
        pytest.approx(66.0),
    )


def test_confidence_interval_and_paired_difference_known_answers():
    # 1, 2, 3: mean 2, std 1, half width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    stats = gather_glue_results.interval([1.0, 2.0, 3.0])
    assert (stats["mean"], stats["std"], stats["n"]) == (2.0, 1.0, 3)
    assert (stats["ci95_low"], stats["ci95_high"]) == (
        pytest.approx(2 - 2.48414, abs=1e-5),
        pytest.approx(2 + 2.48414, abs=1e-5),
    )
    assert math.isnan(gather_glue_results.interval([5.0])["ci95_low"])
    # Seeds 1-4 shared (differences 1, 2, 1, 2), seed 5 baseline only, seed 6 model only.
    model = pd.Series([10.0, 12.0, 11.0, 13.0, 50.0], index=[1, 2, 3, 4, 6])
    base = pd.Series([9.0, 10.0, 10.0, 11.0, 0.0], index=[1, 2, 3, 4, 5])
    diff = gather_glue_results.paired_difference(model, base)
    # mean 1.5, std 0.57735, half width t(0.975, 3) * 0.57735 / 2 = 0.91869; t = 5.196, p = 0.013847
    assert (diff["diff"], diff["diff_n"]) == (pytest.approx(1.5), 4)
    assert (diff["diff_ci95_low"], diff["diff_ci95_high"]) == (
        pytest.approx(0.58131, abs=1e-5),
        pytest.approx(2.41869, abs=1e-5),
    )
    assert diff["diff_p"] == pytest.approx(0.0138468, abs=1e-6)


def test_baseline_differences_in_csv_and_table(tmp_path, capsys):
    root = tmp_path / "results"
    accuracies = {
        "base": {1: 0.09, 2: 0.10, 3: 0.10, 4: 0.11, 5: 0.5},
        "moe": {1: 0.10, 2: 0.12, 3: 0.11, 4: 0.13, 6: 0.9},
    }
    for model, by_seed in accuracies.items():
        for seed, accuracy in by_seed.items():
            run_dir = root / model / "rte" / f"seed_{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "eval_results.json").write_text(json.dumps({"eval_accuracy": accuracy}))
            (run_dir / "config.json").write_text(json.dumps({"model_type": "electra_moe", "num_experts": 1}))
    assert gather_glue_results.main([str(root), "--baseline", "base"]) == 0
    moe = summary_by_model(root / "glue_results_summary.csv").loc["moe"]
    assert (moe["rte_diff"], moe["rte_diff_n"], moe["rte_diff_p"]) == (
        pytest.approx(1.5),
        4,
        pytest.approx(0.0138468, abs=1e-6),
    )
    assert (moe["rte_diff_ci95_low"], moe["rte_diff_ci95_high"]) == (
        pytest.approx(0.58131, abs=1e-4),
        pytest.approx(2.41869, abs=1e-4),
    )
    assert moe["electra_rte_diff"] == pytest.approx(1.5)
    assert summary_by_model(root / "glue_results_summary.csv").loc["base", "rte_diff"] == 0.0
    tables = markdown_tables(capsys.readouterr().out)
    paired = next(
        rows
        for title, rows in tables.items()
        if title.startswith("GLUE leaderboard") and "Paired difference to base" in title
    )
    assert [row[0] for row in paired[1:]] == ["moe"]
    assert paired[1][paired[0].index("rte")] == "+1.5 [+0.6, +2.4] p=0.014 (4)"
    assert gather_glue_results.main([str(root), "--baseline", "nope"]) == EXIT_BAD_INPUT


def test_expert_choice_is_named_as_such_not_as_top_k(tmp_path, capsys):
    """Expert choice saves a top_k it ignores: the tables say EC and record the router type."""
    root = tmp_path / "results"
    configs = {
        "moe-8x2": {"model_type": "electra_moe", "num_experts": 8, "top_k": 2, "model_size": "tiny"},
        "ec-8": {"model_type": "electra_moe", "num_experts": 8, "top_k": 2, "capacity_factor": 2.0,
                 "router_type": "expert_choice", "model_size": "tiny"},
        "dense": {"model_type": "electra_moe", "num_experts": 1, "model_size": "tiny"},
    }  # fmt: skip
    for model, config in configs.items():
        run_dir = root / model / "rte" / "seed_1"
        run_dir.mkdir(parents=True)
        (run_dir / "eval_results.json").write_text(json.dumps(eval_results("rte", 0.6)))
        (run_dir / "config.json").write_text(json.dumps(config))
    assert gather_glue_results.main([str(root), "--format", "markdown"]) == 0
    summary = summary_by_model(root / "glue_results_summary.csv")
    assert summary.loc["ec-8", "router_type"] == "expert_choice"
    assert summary.loc["moe-8x2", "router_type"] == "softmax_topk"
    assert pd.isna(summary.loc["dense", "router_type"])
    rows = {row[0]: row for row in markdown_rows(capsys.readouterr().out)}
    header = rows["model"]
    top_k = header.index("top-k")
    assert (rows["ec-8"][top_k], rows["moe-8x2"][top_k]) == ("EC", "2")
