"""The benchmarks still run against the current model and trainer APIs (tiny settings, no timing asserted)."""

import json

import pytest
import torch

from bench import bench_expert_gemms, bench_moe, bench_pretrain
from modeling_electra import ElectraMoEForMaskedLM, ElectraMoEForPreTraining
from modeling_electra_config import ElectraMoEConfig, make_generator_config
from rtd import ElectraPretrainingModel


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


def tiny_configs(**moe):
    """A 1-layer discriminator (embeddings 4 wide, vocabulary 10) and its 6-wide generator."""
    sizes = dict(num_hidden_layers=1, embedding_size=4, vocab_size=10, max_position_embeddings=64)
    disc = ElectraMoEConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16, **sizes, **moe)
    gen = ElectraMoEConfig(hidden_size=6, num_attention_heads=1, intermediate_size=8, **sizes)
    return disc, gen


def test_rtd_step_flops_matches_a_hand_count():
    """One sequence of 10 tokens, 1 of them masked (ELECTRA's cap at length 10: int(0.155 x 10) = 1)."""
    assert bench_pretrain.masked_per_sequence(10) == 1 and bench_pretrain.masked_per_sequence(128) == 19
    # Discriminator, per token: Q/K/V/O 4 x 2 x 8 x 8 = 512, scores and values 2 x 2 x 10 x 8 = 320, FFN
    # 2 x 2 x 8 x 16 = 512, projection 2 x 4 x 8 = 64, head 2 x 8 x 8 + 2 x 8 = 144: 1552 x 10 tokens.
    # Generator, per token: 4 x 2 x 6 x 6 = 288, 2 x 2 x 10 x 6 = 240, 2 x 2 x 6 x 8 = 192, 2 x 4 x 6 = 48:
    # 768 x 10 tokens; its MLM head on the masked token: 2 x 6 x 4 + 2 x 4 x 10 = 128. Backward = 2 x forward.
    generator = 7680 + 128
    assert bench_pretrain.rtd_step_flops(*tiny_configs(), batch=1, seq_len=10) == 3 * (15520 + generator)
    # 4 experts, top-2: the FFN becomes the router 2 x 8 x 4 = 64 plus two experts 2 x 512 per token.
    top2 = tiny_configs(num_experts=4, top_k=2)
    assert bench_pretrain.rtd_step_flops(*top2, 1, 10) == 3 * (15520 + 10 * (64 + 512) + generator)
    # Expert choice at capacity factor 2, 3 experts: each takes ceil(2 x 10 / 3) = 7 tokens, 2.1 per token.
    expert_choice = tiny_configs(num_experts=3, router_type="expert_choice", capacity_factor=2.0)
    moe_ffn = 2 * 8 * 3 + 2.1 * 512
    expected = 3 * (15520 + 10 * (moe_ffn - 512) + generator)
    assert bench_pretrain.rtd_step_flops(*expert_choice, 1, 10) == pytest.approx(expected)


@pytest.mark.parametrize(
    "moe",
    [
        dict(),
        dict(num_experts=4, top_k=2),
        dict(num_experts=3, top_k=1, router_type="noisy_topk"),
        dict(num_experts=3, router_type="expert_choice", capacity_factor=2.0),
    ],
    ids=["dense", "top2", "noisy-top1", "expert-choice"],
)
def test_rtd_step_flops_agrees_with_torch_flop_counter(moe):
    """torch's FlopCounterMode over a real forward + backward of the RTD objective counts the same matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    tokenizer = bench_pretrain.load_bench_tokenizer()
    sizes = dict(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, embedding_size=16, num_hidden_layers=2
    )
    disc = ElectraMoEConfig.from_preset("tiny", vocab_size=1200, **sizes, **moe)
    gen = make_generator_config(disc, generator_size=1 / 2)
    for config in (disc, gen):
        config._attn_implementation = "eager"  # matmuls FlopCounterMode sees (it has no CPU SDPA formula)
    torch.manual_seed(0)
    model = ElectraPretrainingModel(ElectraMoEForMaskedLM(gen), ElectraMoEForPreTraining(disc), tokenizer)
    input_ids = bench_pretrain.random_blocks(3, 40, 1200, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        model(input_ids)["loss"].backward()
    expected = bench_pretrain.rtd_step_flops(disc, gen, batch=3, seq_len=40)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_bench_pretrain_default_grids_and_bad_arguments(capsys):
    study = ["dense", "dense-2x"] + [f"moe{e}-top{k}" for e in (2, 4, 8) for k in (1, 2)]
    assert bench_pretrain.config_names(bench_pretrain.parse_args([])) == study
    quick = bench_pretrain.parse_args(["--quick"])
    assert bench_pretrain.config_names(quick) == ["dense", "dense-2x", "moe8-top2"] and quick.sizes == [
        "small"
    ]
    assert bench_pretrain.config_spec("dense-2x", "base")["flags"] == ["--intermediate_size", "6144"]
    spec = bench_pretrain.config_spec("moe64-ec2", "small")
    assert spec["reference"] == "dense-2x" and "expert_choice" in spec["flags"]
    for argv, message in [
        (["--configs", "dense", "sparse"], "unknown configuration 'sparse'"),
        (["--configs", "moe2-top4"], "top-k must be at most"),
        (["--max_seq_length", "513"], "--max_seq_length must be between"),
        (["--sizes", "large"], "invalid choice"),
        (["--peak_tflops", "0"], "--peak_tflops must be > 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            bench_pretrain.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


@pytest.mark.slow
def test_bench_pretrain_step_runs(tmp_path, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **_: compiled.append(fn) or fn)  # wiring, not speed
    output = tmp_path / "pretrain.json"
    argv = ["--sizes", "tiny", "--configs", "dense", "dense-2x", "moe4-top2", "moe4-ec1", "--batch_size", "2"]
    argv += ["--max_seq_length", "16", "--repeats", "1", "--warmup", "0", "--skip_data", "--threads", "1"]
    scaling = ["--compile", "--gradient_checkpointing"]
    assert bench_pretrain.main([*argv, "--peak_tflops", "100", *scaling, "--output", str(output)]) == 0
    payload = json.loads(output.read_text())
    steps = {row["name"]: row for row in payload["steps"]}
    assert list(steps) == ["dense", "dense-2x", "moe4-top2", "moe4-ec1"]
    assert len(compiled) == 4 * 2 * 4  # each configuration's generator and discriminator layers (tiny: 4)
    assert payload["gradient_checkpointing"] and all(row["scaling"] == scaling for row in steps.values())
    assert steps["moe4-top2"]["reference"] == "dense-2x" and steps["moe4-ec1"]["reference"] == "dense"
    assert steps["moe4-top2"]["parameters"] > steps["dense-2x"]["parameters"] > steps["dense"]["parameters"]
    for row in steps.values():
        assert (row["size"], row["batch"], row["seq_len"], row["tokens_per_step"]) == ("tiny", 2, 16, 32)
        assert row["tflops_per_s"] == pytest.approx(row["flops_per_step"] / row["step_s"] / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 100)
    # top-2 and dense-2x do the same FFN work, plus the router: 3 (fwd + bwd) x 2 x 32 tokens x hidden 128 x
    # 4 experts x 4 layers; expert choice at capacity factor 1 that of dense
    router = 3 * 2 * 32 * 128 * 4 * 4
    assert steps["moe4-top2"]["flops_per_step"] == steps["dense-2x"]["flops_per_step"] + router
    assert steps["moe4-ec1"]["flops_per_step"] == steps["dense"]["flops_per_step"] + router
    table = capsys.readouterr().out
    assert (
        "`tiny`, batch 2 x 16 tokens, --compile, --gradient_checkpointing" in table
        and "| TFLOP/s | MFU |" in table
    )
    assert payload["peak_tflops"] == 100 and "3 x the forward" in payload["flops_counted"]
    assert bench_pretrain.main([*argv, "--configs", "dense", "--output", str(output)]) == 0
    (row,) = json.loads(output.read_text())["steps"]
    assert "mfu" not in row and "MFU" not in capsys.readouterr().out  # no MFU on CPU unless asked


def test_bench_pretrain_keeps_the_sizes_measured_when_one_runs_out_of_memory(tmp_path, monkeypatch, capsys):
    def fake_size(args, size, *rest):
        if size == "base":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12 GiB")
        row = dict(size=size, name="dense", reference="dense", ratio=1.0, parameters=1e6, batch=2, seq_len=8,
                   step_s=1.0, tokens_per_s=16.0, tflops_per_s=1e-6)  # fmt: skip
        return [row]

    monkeypatch.setattr(bench_pretrain, "bench_size", fake_size)
    output = tmp_path / "pretrain.json"
    argv = ["--sizes", "small", "base", "--skip_data", "--threads", "1", "--output", str(output)]
    assert bench_pretrain.main(argv) == 1
    payload = json.loads(output.read_text())
    assert [row["size"] for row in payload["steps"]] == ["small"]
    assert payload["errors"] == [
        dict(size="base", error="out of memory: CUDA out of memory. Tried to allocate 12 GiB")
    ]
    assert "`base` not measured: out of memory" in capsys.readouterr().out


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
        assert set(row["methods"]) == set(bench_expert_gemms.GEMM_METHODS)
        assert row["methods"]["dense"]["total_ratio"] == 1.0
        assert all(ms > 0 for ms in row["methods"]["per_expert"]["min_ms"].values())
    assert bench_expert_gemms.main(["--shapes", "small", "--experts", "3", "--tokens", "256"]) == 2
    assert "equal slices" in capsys.readouterr().err


def test_expert_divergence_known_answers_and_saved_models(tmp_path, capsys):
    """Copies have moved 0 and spread 0; doubling one of 8 experts gives moved 1/8 and spread 0.875*2/8/1.125."""
    from transformers import ElectraConfig, ElectraForPreTraining

    from bench import expert_divergence
    from test_modeling import TINY
    from upcycling import upcycle_dense_to_moe

    weight = torch.randn(1, 6, 10)
    experts = weight.repeat(8, 1, 1)
    experts[0] *= 2
    (row,) = expert_divergence.divergence({0: weight}, {0: experts})
    assert row["experts"] == 8 and row["moved"] == pytest.approx(1 / 8)
    assert row["spread"] == pytest.approx((0.875 + 7 * 0.125) / 8 / 1.125)

    torch.manual_seed(0)
    dense = ElectraForPreTraining(ElectraConfig(**TINY))
    dense.save_pretrained(tmp_path / "dense")
    upcycled = upcycle_dense_to_moe(dense, ElectraMoEConfig(**TINY, num_experts=4, top_k=2))
    with torch.no_grad():
        upcycled.electra.encoder.layer[1].moe.experts.weight_in[3] += 1.0
    upcycled.save_pretrained(tmp_path / "moe")
    argv = ["--dense", str(tmp_path / "dense"), "--compare", str(tmp_path / "moe")]
    assert expert_divergence.main(argv) == 0
    lines = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    values = {int(cells[2]): (float(cells[4]), float(cells[5])) for cells in lines}
    assert values[0] == (0.0, pytest.approx(0.0, abs=1e-6)) and values[1][0] > 0 and values[1][1] > 0
    assert expert_divergence.main(["--dense", str(tmp_path), "--compare", str(tmp_path / "moe")]) == 2
    assert "no *.safetensors" in capsys.readouterr().err
