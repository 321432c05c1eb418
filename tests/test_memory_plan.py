"""bench/memory_plan.py: parameter counts equal the built models; the per-GPU arithmetic; bad input."""

import pytest
import torch

import wikitext_trainer as wt
from bench import memory_plan
from rtd import ElectraPretrainingModel


@pytest.mark.parametrize(
    "flags",
    [
        ["--model_size", "tiny", "--num_experts", "1"],
        ["--model_size", "tiny", "--num_experts", "8", "--top_k", "2", "--router_type", "noisy_topk"],
        ["--model_size", "small", "--num_experts", "4", "--top_k", "1", "--generator_moe"],
        [
            "--model_size",
            "base",
            "--num_experts",
            "2",
            "--router_type",
            "expert_choice",
            "--moe_layer_frequency",
            "2",
        ],
    ],
)
def test_parameter_counts_equal_the_built_models(flags, tokenizer):
    disc, gen = wt.build_model_configs(wt.parse_args(flags), memory_plan.ELECTRA_VOCAB_SIZE)
    with torch.device("meta"):
        generator, discriminator = wt.build_models(disc, gen)
        model = ElectraPretrainingModel(generator, discriminator, tokenizer)
    counts = memory_plan.count_parameters(disc, gen)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # shared embeddings once
    layers = [*generator.electra.encoder.layer, *discriminator.electra.encoder.layer]
    assert sorted(counts["layers"]) == sorted(sum(p.numel() for p in layer.parameters()) for layer in layers)


def test_issue_sizes_and_per_gpu_arithmetic():
    disc, gen = memory_plan.configs("base", 64, 2, 512)
    result = memory_plan.plan(disc, gen, batch=32, seq_len=512, gpus=8, gpu_gib=80, bf16=True, reserve_gib=4)
    assert 3.6e9 < result.parameters < 3.8e9  # the issue's ~3.7 B
    ddp, fsdp, ckpt = (result.per_gpu[mode] for mode in memory_plan.MODES)
    assert ddp["weights"] == 4 * result.parameters and ddp["adamw"] == 8 * result.parameters
    assert fsdp["adamw"] == ddp["adamw"] / 8 and fsdp["weights"] == ddp["weights"] / 8
    assert ckpt["activations"] < fsdp["activations"] == ddp["activations"]
    assert result.fits == {"DDP": False, "FSDP": True, "FSDP + ckpt": True}
    large = memory_plan.configs("large", 64, 2, 512)
    assert 12.5e9 < memory_plan.count_parameters(*large)["total"] < 13.5e9  # ~13 B


def test_cli_prints_the_plan_and_refuses_bad_input(capsys):
    assert memory_plan.main(["--model_size", "small", "--num_experts", "8", "--num_gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "| FSDP + ckpt |" in out and "parameters" in out
    with pytest.raises(SystemExit) as exit_info:
        memory_plan.main(["--num_gpus", "0"])
    assert exit_info.value.code == 2 and "--num_gpus" in capsys.readouterr().err
