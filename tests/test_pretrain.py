"""A tiny ELECTRA-MoE pretraining run on the fixture corpus: it learns, logs, and saves loadable models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import modeling_electra
import rtd
import wikitext_trainer as wt
from conftest import REPO_ROOT
from input_checks import EXIT_BAD_INPUT
from pretrain_utils import read_metrics, trainer_argv

STEPS = 150
NUM_EXPERTS, TOP_K, LAYERS = 4, 2, 2
# Wider than the other tests' model so the discriminator learns context within a few seconds of training.
LEARNING_FLAGS = [
    "--hidden_size", "64", "--intermediate_size", "128", "--embedding_size", "64",
    "--num_experts", str(NUM_EXPERTS), "--top_k", str(TOP_K), "--batch_size", "16",
    "--max_training_steps", str(STEPS), "--warmup_steps", "10", "--learning_rate", "5e-4",
    "--logging_steps", "10", "--eval_steps", "50", "--save_steps", "1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, vocab_dir):
    root = tmp_path_factory.mktemp("pretrain")
    argv = trainer_argv(root, vocab_dir, *LEARNING_FLAGS)
    assert wt.main(argv) == 0
    return root / "out" / "run", argv


def test_losses_fall_and_the_discriminator_beats_the_all_original_baseline(finished_run):
    run_dir, _ = finished_run
    train = read_metrics(run_dir, "train")
    assert [r["step"] for r in train] == list(range(10, STEPS + 1, 10))
    for key in ("loss", "gen_loss", "disc_loss"):
        assert train[-1][key] < 0.9 * train[0][key], (
            f"{key} did not fall: {train[0][key]} -> {train[-1][key]}"
        )
    validation = read_metrics(run_dir, "validation")
    assert [r["step"] for r in validation] == [50, 100, 150]
    final = validation[-1]
    assert final["disc_accuracy"] > final["disc_baseline_accuracy"], final
    assert final["disc_f1"] > 0.05
    assert 0.05 < final["replaced_fraction"] < rtd.MASK_PROB, (
        "replaced tokens: masked and sampled differently"
    )
    assert final["gen_accuracy"] > 0.05


def test_learning_rate_follows_electras_schedule_by_default(finished_run):
    """ELECTRA's: linear decay to 0 over all steps x min(1, step / warmup) (transformers' decays from warmup)."""
    run_dir, _ = finished_run
    for record in read_metrics(run_dir, "train"):
        expected = 5e-4 * (1 - record["step"] / STEPS) * min(1.0, record["step"] / 10)
        assert record["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), record["step"]
    defaults = wt.parse_args([])
    assert (defaults.lr_schedule, defaults.example_format) == ("electra", "electra")
    assert wt.parse_args(["--lr_schedule", "linear", "--example_format", "packed"]).lr_schedule == "linear"


def test_metrics_hold_losses_rates_and_per_layer_routing(finished_run):
    run_dir, _ = finished_run
    records = read_metrics(run_dir)
    keys = {"step", "split", "loss", "gen_loss", "disc_loss", "gen_accuracy", "disc_accuracy", "disc_f1",
            "aux_loss", "z_loss", "expert_load", "router_entropy"}  # fmt: skip
    for record in records:
        assert keys <= record.keys(), keys - record.keys()
        load = torch.tensor(record["expert_load"])
        assert load.shape == (LAYERS, NUM_EXPERTS)
        assert torch.allclose(load.sum(-1), torch.ones(LAYERS), atol=1e-4)
        assert len(record["router_entropy"]) == LAYERS
        # Dropless top-2 token choice: every real token is taken by exactly TOP_K experts in every layer.
        per_token = torch.tensor(record["experts_per_token"])
        assert per_token.shape == (LAYERS, NUM_EXPERTS + 1)
        assert torch.allclose(per_token[:, TOP_K], torch.ones(LAYERS)), per_token
        assert all(
            0 < h <= torch.log(torch.tensor(NUM_EXPERTS)).item() + 1e-4 for h in record["router_entropy"]
        )
    train = read_metrics(run_dir, "train")
    assert all(r["tokens_per_second"] > 0 for r in train)
    assert max(r["lr"] for r in train) <= 5e-4 and train[-1]["lr"] == 0.0, "linear warmup then decay to zero"
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard scalars missing"
    args = json.loads((run_dir / "training_args.json").read_text())
    assert args["num_experts"] == NUM_EXPERTS and args["total_steps"] == STEPS


def test_expert_choice_router_from_the_command_line(tmp_path, vocab_dir):
    """--router_type expert_choice --expert_choice_scope reach the saved config; no aux loss is logged."""
    argv = trainer_argv(
        tmp_path, vocab_dir, "--num_experts", "4", "--router_type", "expert_choice",
        "--expert_choice_scope", "batch", "--max_training_steps", "3", "--eval_steps", "3",
    )  # fmt: skip
    assert wt.main(argv) == 0
    run_dir = tmp_path / "out" / "run"
    config = json.loads((run_dir / "discriminator" / "config.json").read_text())
    assert (config["router_type"], config["expert_choice_scope"], config["capacity_factor"]) == (
        "expert_choice",
        "batch",
        2.0,
    )
    for record in read_metrics(run_dir):
        assert record["aux_loss"] == 0.0
        per_token = torch.tensor(record["experts_per_token"])
        assert per_token.shape == (2, 5) and torch.allclose(per_token.sum(-1), torch.ones(2))


def test_outputs_load_with_the_auto_classes(finished_run, vocab_dir):
    run_dir, _ = finished_run
    disc = AutoModelForPreTraining.from_pretrained(run_dir / "discriminator")
    gen = AutoModelForMaskedLM.from_pretrained(run_dir / "generator")
    assert isinstance(disc, modeling_electra.ElectraMoEForPreTraining)
    assert isinstance(gen, modeling_electra.ElectraMoEForMaskedLM)
    assert (disc.config.num_experts, disc.config.top_k) == (NUM_EXPERTS, TOP_K)
    assert gen.config.num_experts == 1 and gen.config.hidden_size == 16, "dense generator, 1/4 width"
    disc_embeddings = disc.electra.embeddings.word_embeddings.weight
    assert torch.equal(gen.electra.embeddings.word_embeddings.weight, disc_embeddings), (
        "embeddings not shared"
    )
    assert torch.equal(
        gen.electra.embeddings.position_embeddings.weight, disc.electra.embeddings.position_embeddings.weight
    )
    assert torch.equal(gen.generator_lm_head.weight, disc_embeddings)

    for part in ("discriminator", "generator"):
        tokenizer = AutoTokenizer.from_pretrained(run_dir / part)
        assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(vocab_dir).get_vocab()
    classifier = AutoModelForSequenceClassification.from_pretrained(run_dir / "discriminator", num_labels=2)
    assert torch.equal(
        classifier.electra.encoder.layer[0].moe.experts.weight_in,
        disc.electra.encoder.layer[0].moe.experts.weight_in,
    )

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "discriminator")
    batch = tokenizer(["the cat sat on the mat ."], return_tensors="pt")
    logits = disc(**batch).logits
    assert logits.shape == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_a_finished_run_is_not_overwritten_unless_asked(finished_run, capsys):
    run_dir, argv = finished_run
    before = (run_dir / "discriminator" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        wt.main(argv)
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run_dir / "discriminator" / "model.safetensors").stat().st_mtime_ns == before


def test_an_unfinished_run_needs_resume_or_overwrite(tmp_path, vocab_dir, capsys):
    run_dir = tmp_path / "out" / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit):
        wt.main(trainer_argv(tmp_path, vocab_dir))
    assert "--resume_from_checkpoint auto" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(tmp_path, vocab_dir):
    """`torchrun` with two CPU processes: accelerate must run real DDP (gloo), not two independent runs."""
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = trainer_argv(
        tmp_path, vocab_dir, "--max_training_steps", "4", "--save_steps", "2", "--num_experts", "2"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO_ROOT / "wikitext_trainer.py"),
            *argv,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "run"
    assert json.loads((run_dir / "training_args.json").read_text())["num_processes"] == 2
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1, 2, 3, 4], (
        "one log line per step, not per process"
    )
    assert AutoModelForPreTraining.from_pretrained(run_dir / "discriminator").config.num_experts == 2
