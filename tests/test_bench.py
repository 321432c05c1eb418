"""The benchmarks still run against the current model and trainer APIs (tiny settings, no timing asserted)."""

import json

import pytest
import torch

from bench import bench_expert_gemms, bench_moe, bench_pretrain


def test_bench_moe_runs_every_method_and_writes_json(tmp_path):
    output = tmp_path / "moe.json"
    argv = ["--shapes", "small", "--experts", "4", "--top_k", "2", "--tokens", "128", "--repeats", "1"]
    argv += ["--warmup", "0", "--output", str(output)]
    assert bench_moe.main(argv) == 0
    payload = json.loads(output.read_text())
    (row,) = payload["rows"]
    assert (row["num_experts"], row["top_k"], row["tokens"]) == (4, 2, 128)
    measured = set(row["methods"]) | set(row["skipped"])
    assert measured == set(bench_moe.METHODS)
    for name, result in row["methods"].items():
        assert result["ms"] > 0 and result["peak_mb"] > 0, name
    assert row["methods"]["dense"]["ratio"] == 1.0
    assert len(row["tokens_per_expert"]) == 4 and sum(row["tokens_per_expert"]) == 128 * 2


def test_bench_moe_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_moe.main(["--methods", "loop"])
    assert "dense" in capsys.readouterr().err
    assert bench_moe.main(["--tokens", "100", "--shapes", "small"]) == 2


@pytest.mark.slow
def test_bench_pretrain_step_runs(tmp_path):
    output = tmp_path / "pretrain.json"
    argv = ["--quick", "--batch_size", "2", "--repeats", "1", "--warmup", "0", "--skip_data"]
    assert bench_pretrain.main([*argv, "--output", str(output)]) == 0
    steps = {row["name"]: row for row in json.loads(output.read_text())["steps"]}
    assert set(steps) == {"dense", "dense-2x", "moe8-top2"}
    assert steps["moe8-top2"]["reference"] == "dense-2x"
    assert steps["moe8-top2"]["parameters"] > steps["dense-2x"]["parameters"] > steps["dense"]["parameters"]


def test_expert_gemm_runners_compute_each_kinds_product():
    """Per-expert `mm` and `bmm` write a @ b for every kind, with the per-expert shapes of an FFN."""
    operands = bench_expert_gemms.matmul_operands(64, 8, 16, 4, torch.device("cpu"), torch.float32)
    assert set(operands) == set(bench_expert_gemms.KINDS)
    assert operands["up"][2].shape == (4, 16, 16) and operands["grad_w_in"][2].shape == (4, 8, 16)
    assert operands["grad_w_out"][2].shape == (4, 16, 8) and operands["grad_input"][2].shape == (4, 16, 8)
    for kind, (a, b, out) in operands.items():
        for method in ("per_expert", "bmm"):
            out.zero_()
            bench_expert_gemms.matmul_runner(method, a, b, out)()
            torch.testing.assert_close(out, a @ b, msg=f"{kind} {method}")


def test_bench_expert_gemms_runs_and_rejects_uneven_slices(tmp_path, capsys):
    output = tmp_path / "gemms.json"
    argv = ["--shapes", "small", "--experts", "4", "--top_k", "1", "2", "--tokens", "256", "--repeats", "1"]
    assert bench_expert_gemms.main([*argv, "--warmup", "0", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert [(row["top_k"], row["rows_per_expert"]) for row in rows] == [(1, 64), (2, 128)]
    for row in rows:
        assert set(row["methods"]) == set(bench_expert_gemms.METHODS)
        assert row["methods"]["dense"]["total_ratio"] == 1.0
        assert all(ms > 0 for ms in row["methods"]["per_expert"]["min_ms"].values())
    assert bench_expert_gemms.main(["--shapes", "small", "--experts", "3", "--tokens", "256"]) == 2
    assert "equal slices" in capsys.readouterr().err
