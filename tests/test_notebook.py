"""The results notebook runs headless on fixture results and saves every figure as a PNG."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest

import gather_glue_results
import run_study
from glue_results_fixture import SEEDS, make_pretraining_run, make_results_tree

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "glue_evaluation_results_visualizer.ipynb"
EXPECTED_FIGURES = [
    "glue_task_scores.png",
    "glue_score_heatmap.png",
    "glue_delta_vs_dense.png",
    *[f"glue_paired_difference_{task}.png" for task in ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")],
    "pretraining_curves.png",
    "expert_load_pretrain_run.png",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parameter_cells(notebook):
    return [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]


def test_notebook_has_one_parameter_cell_and_no_stored_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = parameter_cells(notebook)
    assert len(cells) == 1
    assert all(name in cells[0].source for name in ("SUMMARY_CSV", "PRETRAIN_DIR", "FIGURE_DIR", "BASELINE"))
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_notebook_executes_and_saves_pngs(tmp_path):
    results = make_results_tree(tmp_path / "results")
    assert gather_glue_results.main([str(results)]) == 0
    pretrain = make_pretraining_run(tmp_path / "pretrain_run")
    figures = tmp_path / "figures"

    notebook = run_study.execute_notebook(
        results / "glue_results_summary.csv", pretrain, figures, tmp_path / "executed.ipynb"
    )

    for name in EXPECTED_FIGURES:
        path = figures / name
        assert path.is_file(), f"{name} not saved"
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 10_000
    printed = stream_text(notebook)
    assert "saved figures:" in printed
    assert "scores: ELECTRA paper" in printed  # the notebook names the convention it plots
    assert "heatmap shows the mean" not in printed


def stream_text(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "stream"
    )


def displayed_text(notebook) -> str:
    return "".join(
        output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type in ("display_data", "execute_result")
    )


@pytest.mark.slow
def test_heatmap_falls_back_to_the_common_tasks_mean(tmp_path):
    """A mini-study (CoLA, SST-2, RTE, WNLI) has no GLUE score: the heatmap shows the common-task mean.
    With BASELINE named, every other model, the dense one included, is compared with it."""
    results = make_results_tree(tmp_path / "results")
    for task_dir in results.glob("*/*"):
        if task_dir.is_dir() and task_dir.name not in ("cola", "sst2", "rte", "wnli"):
            shutil.rmtree(task_dir)
    shutil.rmtree(results / "original_study_4experts")
    assert gather_glue_results.main([str(results)]) == 0
    notebook = run_study.execute_notebook(
        results / "glue_results_summary.csv",
        None,
        tmp_path / "figures",
        tmp_path / "executed.ipynb",
        baseline="moe4_top1",
    )
    printed = stream_text(notebook)
    compared = displayed_text(notebook)
    assert "dense (dense) − moe4_top1" in compared and "moe4_top2" in compared
    assert "moe4_top1 (E=4, k=1) − moe4_top1" not in compared
    assert "no configuration has all 8 GLUE tasks: the heatmap shows the mean over cola sst2 rte" in printed
    assert (tmp_path / "figures" / "glue_score_heatmap.png").is_file()
    assert (tmp_path / "figures" / "glue_paired_difference_rte.png").is_file()


# Test-only cells: after the setup cell, record every text drawn on each saved figure; at the end, print them.
RECORD_TEXTS = """
import matplotlib.text
_drawn, _save = {}, save
def save(fig, name):
    _drawn[name] = [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    _save(fig, name)
"""
PRINT_TEXTS = "import json\nprint('DRAWN=' + json.dumps(_drawn))"


@pytest.mark.slow
def test_one_seed_is_marked_and_draws_no_interval_or_p_value(tmp_path, monkeypatch):
    """Every run has one seed: no figure claims an interval or prints a p-value it does not have."""
    results = make_results_tree(tmp_path / "results")
    for seed_dir in results.glob("*/*/seed_*"):
        if seed_dir.name != f"seed_{SEEDS[0]}":
            shutil.rmtree(seed_dir)
    assert gather_glue_results.main([str(results)]) == 0
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    setup = next(i for i, cell in enumerate(notebook.cells) if "def save(fig, name)" in cell.source)
    notebook.cells.insert(setup + 1, nbformat.v4.new_code_cell(RECORD_TEXTS))
    notebook.cells.append(nbformat.v4.new_code_cell(PRINT_TEXTS))
    patched = tmp_path / "notebook.ipynb"
    nbformat.write(notebook, patched)
    monkeypatch.setattr(run_study, "NOTEBOOK", patched)

    executed = run_study.execute_notebook(
        results / "glue_results_summary.csv", None, tmp_path / "figures", tmp_path / "executed.ipynb"
    )
    printed = stream_text(executed)
    drawn = json.loads(printed[printed.index("DRAWN=") + len("DRAWN=") :].splitlines()[0])
    assert not [(name, text) for name, texts in drawn.items() for text in texts if "nan" in text.lower()]
    assert "n = 1" in drawn["glue_task_scores"]
    assert any("n = 1: one seed, no interval" in text for text in drawn["glue_paired_difference_rte"])
