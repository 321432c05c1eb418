"""The GPU kit (bench/gpu_check.sh) keeps running between GPU runs: its CPU dry run end to end, and the
step runner's reporting (a failing step does not stop the others; the budget caps every step)."""

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check
from conftest import REPO_ROOT

MAX_OUTPUT_FILES = 8  # what the device tool brings back from $OUT


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--data", "demo"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "bench_moe.json",
        "bench_pretrain.json",
        "bench_scaling.json",
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
    ]
    assert len(files) <= MAX_OUTPUT_FILES
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == ["environment", "pytest_cuda", "bench_moe", "bench_pretrain", "bench_scaling", "pretrain",
                           "glue"]  # fmt: skip
    assert steps["environment"]["results"]["cuda_available"] is False
    pytest_step = steps["pytest_cuda"]
    assert pytest_step["status"] == "skipped" and "no CUDA" in pytest_step["detail"]
    assert len(pytest_step["results"]["skipped"]) >= 20 and not pytest_step["results"]["failed"]
    assert all(
        steps[name]["status"] == "passed"
        for name in ("bench_moe", "bench_pretrain", "bench_scaling", "pretrain", "glue")
    )
    pretrain = steps["pretrain"]["results"]
    assert pretrain["first_exit"] == gpu_check.REQUEUE_EXIT_CODE and pretrain["second_exit"] == 0
    assert (
        0
        < pretrain["resumed_at_step"]
        < pretrain["final_step"]
        == gpu_check.DRY_PRETRAIN["max_training_steps"]
    )
    assert 0 <= steps["glue"]["results"]["eval_accuracy"] <= 1
    summary = (out / "gpu_check.md").read_text()
    assert (
        "CPU dry run" in summary
        and ["pretrain", "passed"] in step_status(summary)
        and "## bench_moe" in summary
    )
    bench_pretrain = table_rows(summary[summary.index("## bench_pretrain") :])[0]
    assert bench_pretrain[:2] == ["size", "name"]
    assert (
        "tflops_per_s" in bench_pretrain
        and bench_pretrain.index("mfu") == bench_pretrain.index("tflops_per_s") + 1
    )
    assert [row["name"] for row in steps["bench_pretrain"]["results"]["rows"]] == ["dense-2x", "moe8-top2"]
    assert "CUDA tests were skipped" in summary and summary.strip() in proc.stdout


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the first markdown table in `markdown`, header first, the separator line dropped."""
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("|"):
            if rows:
                break
        elif not set(line) <= set("|:- "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def step_status(markdown: str) -> list[list[str]]:
    """(step, status) of each row of the summary's steps table."""
    return [row[:2] for row in table_rows(markdown)]


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    ran = []

    def fake(name, status="passed"):
        def step(check, step, *args):
            ran.append(name)
            if status == "raise":
                raise RuntimeError("boom")
            step.status, step.detail = status, name

        return step

    monkeypatch.setattr(gpu_check, "step_environment", fake("environment"))
    monkeypatch.setattr(gpu_check, "step_pytest", fake("pytest", "raise"))
    monkeypatch.setattr(gpu_check, "step_bench", fake("bench", "failed"))
    monkeypatch.setattr(gpu_check, "step_pretrain", fake("pretrain"))
    monkeypatch.setattr(gpu_check, "step_glue", fake("glue"))
    assert gpu_check.main(["--out", str(tmp_path), "--data", "demo"]) == 1
    assert ran == ["environment", "pytest", "bench", "bench", "bench", "pretrain", "glue"]
    steps = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert (
        steps["pytest_cuda"]["status"] == "failed" and "RuntimeError: boom" in steps["pytest_cuda"]["detail"]
    )
    assert steps["bench_moe"]["status"] == "failed" and steps["glue"]["status"] == "passed"
    assert ["pytest_cuda", "failed"] in step_status((tmp_path / "gpu_check.md").read_text())


def test_an_exhausted_budget_times_out_the_remaining_steps(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--data", "demo", "--budget_s", "0"]) == 1
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert {s["status"] for s in steps} == {"timeout"} and all("no time left" in s["detail"] for s in steps)


def test_bad_data_folder_is_refused_before_anything_runs(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--data", str(tmp_path)]) == 2
    assert "wikitext-2" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_gpu_commands_cover_the_issue_grid():
    moe = gpu_check.bench_moe_command(dry=False, output=REPO_ROOT / "x.json")
    assert moe[moe.index("--device") + 1] == "cuda"
    assert moe[moe.index("--experts") + 1 : moe.index("--top_k")] == ["8", "16", "64"]
    assert moe[moe.index("--shapes") + 1 : moe.index("--experts")] == ["small", "base"]
    pretrain = gpu_check.bench_pretrain_command(dry=False, output=REPO_ROOT / "y.json")
    assert "cuda" in pretrain and "bf16" in pretrain
    assert pretrain[pretrain.index("--sizes") + 1 : pretrain.index("--configs")] == ["small", "base"]
    configs = pretrain[pretrain.index("--configs") + 1 : pretrain.index("--repeats")]
    assert configs == ["dense", "dense-2x", "moe8-top2", "moe64-top1"]
    assert pretrain[pretrain.index("--peak_tflops") + 1] == str(gpu_check.H200_BF16_DENSE_TFLOPS) == "989"
    assert gpu_check.GPU_PRETRAIN["mixed_precision"] == "bf16" and gpu_check.GPU_GLUE["bf16"] is True
    assert gpu_check.GPU_GLUE["max_train_samples"] == 8000 and gpu_check.GPU_GLUE["num_train_epochs"] == 1
    assert gpu_check.DEFAULT_BUDGET_S <= 8 * 60
    scaling = gpu_check.bench_scaling_command(dry=False, output=REPO_ROOT / "z.json")
    assert {"--gradient_checkpointing", "--compile", "cuda", "base", "moe8-top2"} <= set(scaling)
    assert "--compile" not in gpu_check.bench_scaling_command(dry=True, output=REPO_ROOT / "z.json")


def test_a_failed_benchmark_keeps_what_it_saved_and_a_stale_file_is_not_read(tmp_path):
    output = tmp_path / "bench_pretrain.json"
    output.write_text(json.dumps({"steps": [{"size": "small", "name": "stale"}]}))
    saved = {"steps": [{"size": "small", "name": "dense", "tokens_per_s": 1e6, "mfu": 0.3}],
             "errors": [{"size": "base", "error": "out of memory"}]}  # fmt: skip
    write_then_fail = f"import json, sys; open(sys.argv[1], 'w').write({json.dumps(saved)!r}); sys.exit(1)"
    check = gpu_check.Check(tmp_path, 60, {"bench_pretrain": 60}, sys.executable)
    step = gpu_check.Step("bench_pretrain")
    gpu_check.step_bench(check, step, ["-c", write_then_fail, str(output)], output)
    assert step.status == "failed" and "2 rows" in step.detail
    assert step.results["rows"] == [
        {"size": "small", "name": "dense", "tokens_per_s": 1e6, "mfu": 0.3},
        {"size": "base", "name": "not measured: out of memory"},
    ]
    step = gpu_check.Step("bench_pretrain")
    gpu_check.step_bench(check, step, ["-c", "import sys; sys.exit(3)"], output)
    assert step.status == "failed" and step.results == {} and not output.exists()
