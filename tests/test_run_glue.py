"""run_glue.py: recipe defaults, layer-wise learning rates, checkpoint checks and tiny end-to-end runs."""

import json
import math
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    ElectraConfig,
    ElectraForPreTraining,
    ElectraForSequenceClassification,
    EvalPrediction,
    TrainingArguments,
)

import gather_glue_results
import glue_model
import glue_training
import modeling_electra
import run_glue
from glue_tasks import TASKS
from modeling_electra_config import ElectraMoEConfig

GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    embedding_size=32,
    max_position_embeddings=128,
)


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory, vocab_dir) -> Path:
    """A random-init ElectraMoE discriminator (4 experts, top-2) saved with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    torch.manual_seed(0)
    config = ElectraMoEConfig(vocab_size=tokenizer.vocab_size, num_experts=4, top_k=2, **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_moe"
    modeling_electra.ElectraMoEForPreTraining(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load(path: Path | str, task, tokenizer_name=None, **kwargs):
    """glue_model.load_model of a checkpoint folder, resolved as run_glue.py resolves it."""
    workdir = Path(tempfile.mkdtemp())
    resolved = glue_model.resolve_glue_checkpoint(str(path), tokenizer_name, False, workdir)
    return glue_model.load_model(resolved, task, **kwargs)


def run(checkpoint: Path, output_dir: Path, *extra: str) -> int:
    return run_glue.main(
        [
            "--model_name_or_path",
            str(checkpoint),
            "--glue_dir",
            str(GLUE_FIXTURES),
            "--output_dir",
            str(output_dir),
            "--per_device_train_batch_size",
            "8",
            "--num_train_epochs",
            "1",
            "--logging_steps",
            "1",
            *extra,
        ]
    )


def read_submission(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


def no_temporary_dirs(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.slow
def test_classification_and_regression_end_to_end(moe_checkpoint, tmp_path):
    assert run(moe_checkpoint, tmp_path, "--task_name", "cola", "--do_train", "--do_eval", "--do_predict",
               "--seed", "1", *(["--bf16"] if torch.cuda.is_available() else [])) == 0  # fmt: skip
    assert run(moe_checkpoint, tmp_path, "--task_name", "stsb", "--do_train", "--do_eval", "--do_predict",
               "--seed", "1") == 0  # fmt: skip
    cola, stsb = tmp_path / "tiny_moe" / "cola" / "seed_1", tmp_path / "tiny_moe" / "stsb" / "seed_1"
    assert no_temporary_dirs(tmp_path)

    cola_eval = json.loads((cola / "eval_results.json").read_text())
    assert -1.0 <= cola_eval["eval_matthews_correlation"] <= 1.0
    assert cola_eval["eval_samples"] == 8 and math.isfinite(cola_eval["eval_loss"])
    stsb_eval = json.loads((stsb / "eval_results.json").read_text())
    for key in ("eval_pearson", "eval_spearmanr"):
        assert -1.0 <= stsb_eval[key] <= 1.0
    assert stsb_eval["eval_combined_score"] == pytest.approx(
        (stsb_eval["eval_pearson"] + stsb_eval["eval_spearmanr"]) / 2
    )
    all_results = json.loads((stsb / "all_results.json").read_text())
    assert math.isfinite(all_results["train_loss"]) and "eval_pearson" in all_results

    # MoE settings come from the checkpoint; the run config records the recipe actually used.
    config = json.loads((cola / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["top_k"]) == ("electra_moe", 4, 2)
    run_config = json.loads((cola / "run_config.json").read_text())
    assert run_config["hyperparameters"]["learning_rate"] == run_glue.LEARNING_RATE_BY_SIZE["small"]
    assert run_config["hyperparameters"]["layerwise_lr_decay"] == 0.8
    assert run_config["data"]["train"]["rows"] == 13
    assert run_config["bf16"] is torch.cuda.is_available()
    log = [json.loads(line) for line in (cola / "log_history.jsonl").read_text().splitlines()]
    assert any("loss" in record for record in log)

    cola_rows = read_submission(cola / "CoLA.tsv")
    assert [int(r[0]) for r in cola_rows] == list(range(6))
    assert {r[1] for r in cola_rows} <= {"0", "1"}
    stsb_rows = read_submission(stsb / "STS-B.tsv")
    assert len(stsb_rows) == 6 and all(math.isfinite(float(r[1])) for r in stsb_rows)
    assert not (cola / "model").exists(), "the fine-tuned model is kept only with --save_model"

    # gather reads the MoE settings from the config saved in each run dir
    assert gather_glue_results.main([str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "glue_results_summary.csv").set_index("model")
    row = summary.loc["tiny_moe"]
    assert (row["num_experts"], row["top_k"], row["cola_n"], row["stsb_n"], row["rte_n"]) == (4, 2, 1, 1, 0)
    assert row["cola_mean"] == pytest.approx(100 * cola_eval["eval_matthews_correlation"])
    assert math.isnan(row["glue_score"])


def test_router_losses_stay_in_the_training_loss(tmp_path):
    torch.manual_seed(0)
    config = ElectraMoEConfig(vocab_size=100, num_experts=4, top_k=2, num_labels=2, **TINY)
    model = modeling_electra.ElectraMoEForSequenceClassification(config).eval()  # no dropout: comparable
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    trainer = glue_training.LayerwiseDecayTrainer(model=model, args=args, layerwise_lr_decay=0.8)
    inputs = {"input_ids": torch.randint(5, 100, (4, 7)), "labels": torch.tensor([0, 1, 1, 0])}
    loss = trainer.compute_loss(model, inputs)
    outputs = model(input_ids=inputs["input_ids"])
    task_loss = torch.nn.functional.cross_entropy(outputs.logits, inputs["labels"])
    assert outputs.router_loss > 0
    assert loss.item() == pytest.approx((task_loss + outputs.router_loss).item(), rel=1e-5)


@pytest.mark.slow
def test_mnli_matched_mismatched_and_ax(moe_checkpoint, tmp_path):
    assert run(moe_checkpoint, tmp_path, "--task_name", "mnli", "--do_train", "--do_eval", "--do_predict",
               "--seed", "3", "--save_model") == 0  # fmt: skip
    mnli = tmp_path / "tiny_moe" / "mnli" / "seed_3"
    results = json.loads((mnli / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_accuracy_mm", "eval_loss_mm"} <= set(results)
    assert results["eval_samples"] == results["eval_samples_mm"] == 9
    labels = set(TASKS["mnli"].label_names)
    for name, rows in (("MNLI-m.tsv", 6), ("MNLI-mm.tsv", 6), ("AX.tsv", 8)):
        predictions = read_submission(mnli / name)
        assert len(predictions) == rows and {p[1] for p in predictions} <= labels

    # The diagnostic task predicts with the saved MNLI model: same model, same predictions.
    assert run(mnli / "model", tmp_path, "--task_name", "ax", "--seed", "3") == 0
    ax = tmp_path / "tiny_moe" / "ax" / "seed_3"
    assert (ax / "AX.tsv").read_text() == (mnli / "AX.tsv").read_text()
    assert not (ax / "eval_results.json").exists()
    # A checkpoint without a trained MNLI head cannot predict AX.
    assert run(moe_checkpoint, tmp_path / "bad", "--task_name", "ax") == 1
    assert not (tmp_path / "bad" / "tiny_moe" / "ax" / "seed_42").exists()


@pytest.mark.slow
def test_all_tasks_continue_past_failures(moe_checkpoint, tmp_path, caplog):
    glue_dir = tmp_path / "glue"
    for task in ("RTE", "WNLI"):
        shutil.copytree(GLUE_FIXTURES / task, glue_dir / task)
    code = run_glue.main(["--model_name_or_path", str(moe_checkpoint), "--glue_dir", str(glue_dir),
                          "--output_dir", str(tmp_path / "out"), "--task_name", "all", "--max_train_samples", "4",
                          "--num_train_epochs", "1"])  # fmt: skip
    assert code == 1
    finished = sorted(p.parent.parent.name for p in (tmp_path / "out").rglob("eval_results.json"))
    assert finished == ["rte", "wnli"]
    assert "7 of 9 runs failed" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out" / "tiny_moe").iterdir()) == ["rte", "wnli"]


@pytest.mark.slow
def test_existing_run_needs_overwrite(moe_checkpoint, tmp_path, caplog):
    existing = tmp_path / "tiny_moe" / "wnli" / "seed_42"
    existing.mkdir(parents=True)
    (existing / "eval_results.json").write_text("{}")
    assert run(moe_checkpoint, tmp_path, "--task_name", "wnli", "--max_train_samples", "4") == 1
    assert "--overwrite_output_dir" in caplog.text
    assert (existing / "eval_results.json").read_text() == "{}"
    assert (
        run(
            moe_checkpoint,
            tmp_path,
            "--task_name",
            "wnli",
            "--max_train_samples",
            "4",
            "--overwrite_output_dir",
        )
        == 0
    )
    assert "eval_accuracy" in json.loads((existing / "eval_results.json").read_text())
    assert json.loads((existing / "run_config.json").read_text())["data"]["train"]["rows"] == 12
    assert no_temporary_dirs(tmp_path)


def test_missing_encoder_weights_are_an_error(moe_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(moe_checkpoint, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["electra.encoder.layer.1.attention.self.query.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"encoder parameters .*layer\.1\.attention\.self\.query"):
        load(broken, TASKS["rte"])


def test_moe_config_without_expert_count_is_an_error(moe_checkpoint, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(moe_checkpoint, edited)
    config = json.loads((edited / "config.json").read_text())
    del config["num_experts"]
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_experts"):
        load(edited, TASKS["rte"])


def test_plain_electra_and_pretraining_run_dirs_load(tmp_path, vocab_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    run_dir = tmp_path / "wikitext_run"
    dense = ElectraForPreTraining(ElectraConfig(vocab_size=tokenizer.vocab_size, **TINY))
    dense.save_pretrained(run_dir / "discriminator")
    tokenizer.save_pretrained(run_dir / "discriminator")
    checkpoint = glue_model.pretraining_run_model(run_dir)
    assert checkpoint == str(run_dir / "discriminator")
    assert glue_model.default_model_name(str(run_dir / "discriminator")) == "wikitext_run"
    loaded = dense.electra.encoder.layer[1].intermediate.dense.weight
    # transformers' ELECTRA has only its own head; ELECTRA's head reads the checkpoint into the dense ElectraMoE.
    for head, class_name in (
        ("hf", "ElectraForSequenceClassification"),
        (None, "ElectraMoEForSequenceClassification"),
    ):
        _, model = load(checkpoint, TASKS["mnli"], classifier_head=head)
        assert type(model).__name__ == class_name
        assert model.config.num_labels == 3 and model.config.id2label[2] == "contradiction"
        assert torch.equal(model.electra.encoder.layer[1].intermediate.dense.weight, loaded)
    assert (model.config.num_experts, model.config.classifier_head) == (1, "electra")


def test_recipe_defaults_follow_electra():
    small = ElectraMoEConfig(vocab_size=100, model_size="small", **TINY)
    base = ElectraMoEConfig(vocab_size=100, hidden_size=768, num_attention_heads=12, embedding_size=768)
    args = run_glue.parse_args(["--model_name_or_path", "x", "--task_name", "rte"])
    assert args.training.do_train and args.training.do_eval and not args.training.do_predict
    rte = run_glue.resolve_hyperparameters(args, "rte", small)
    assert (rte["learning_rate"], rte["layerwise_lr_decay"], rte["num_train_epochs"]) == (3e-4, 0.8, 10.0)
    assert (rte["per_device_train_batch_size"], rte["max_seq_length"]) == (32, 128)
    assert (rte["warmup_steps"], rte["weight_decay"]) == (0.1, 0.01)
    sst2 = run_glue.resolve_hyperparameters(args, "sst2", base)
    assert (sst2["model_size"], sst2["learning_rate"], sst2["num_train_epochs"]) == ("base", 1e-4, 3.0)
    tiny = ElectraMoEConfig(vocab_size=100, model_size="tiny", hidden_size=128)
    assert run_glue.resolve_hyperparameters(args, "cola", tiny)["learning_rate"] == 3e-4


def test_layerwise_learning_rates_match_google_electra(tmp_path):
    config = ElectraMoEConfig(vocab_size=100, num_experts=4, top_k=2, num_labels=2, **TINY)
    model = modeling_electra.ElectraMoEForSequenceClassification(config)
    lr, decay, n = 1e-3, 0.5, TINY["num_hidden_layers"]
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=lr, weight_decay=0.01, report_to="none")
    trainer = glue_training.LayerwiseDecayTrainer(model=model, args=args, layerwise_lr_decay=decay)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(lr_of) == len(params)
    # google-research/electra: embeddings depth 0, layer i depth i + 1, task head depth n + 2
    expected = {
        "electra.embeddings.word_embeddings.weight": (lr * decay ** (n + 2), 0.01),
        "electra.embeddings.LayerNorm.weight": (lr * decay ** (n + 2), 0.0),
        "electra.encoder.layer.0.attention.self.query.weight": (lr * decay ** (n + 1), 0.01),
        "electra.encoder.layer.1.moe.router.weight": (lr * decay**2, 0.01),
        "electra.encoder.layer.1.moe.experts.bias_in": (lr * decay**2, 0.0),
        "classifier.out_proj.weight": (lr, 0.01),
        "classifier.dense.bias": (lr, 0.0),
    }
    for name, (want_lr, want_wd) in expected.items():
        got_lr, got_wd = lr_of[id(params[name])]
        assert got_lr == pytest.approx(want_lr), name
        assert got_wd == want_wd, name


@pytest.mark.parametrize(
    "argv",
    [
        ["--glue_dir", str(GLUE_FIXTURES), "--train_file", "x.csv", "--task_name", "rte"],
        ["--train_file", "x.csv", "--task_name", "all"],
        ["--task_name", "ax", "--do_train"],
        ["--task_name", "ax", "mnli"],
        ["--task_name", "ax", "--random_init"],
        ["--task_name", "rte", "--layerwise_lr_decay", "1.5"],
        ["--task_name", "rte", "--glue_dir", "/nonexistent/glue"],
        ["--task_name", "rte", "--warmup_ratio", "0.1"],  # transformers 5's --warmup_steps 0.1
    ],
)
def test_bad_arguments_exit_with_usage_error(argv):
    with pytest.raises(SystemExit) as error:
        run_glue.parse_args(["--model_name_or_path", "x", *argv])
    assert error.value.code == 2


def test_random_init_keeps_the_architecture_but_not_the_weights(moe_checkpoint):
    _, pretrained = load(moe_checkpoint, TASKS["sst2"])
    torch.manual_seed(1)
    _, fresh = load(moe_checkpoint, TASKS["sst2"], random_init=True)
    assert (fresh.config.num_experts, fresh.config.top_k) == (4, 2)
    names = dict(pretrained.named_parameters())
    assert names.keys() == dict(fresh.named_parameters()).keys()
    router = "electra.encoder.layer.0.moe.router.weight"
    assert not torch.equal(names[router], dict(fresh.named_parameters())[router])


def test_task_lists_expand():
    args = run_glue.parse_args(["--model_name_or_path", "x", "--task_name", "rte", "all", "cola"])
    assert args.tasks == ["rte", "cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "wnli"]
    ax = run_glue.parse_args(["--model_name_or_path", "x", "--task_name", "ax"])
    assert ax.tasks == ["ax"] and ax.training.do_predict and not ax.training.do_train


@pytest.mark.slow
def test_random_init_runs_are_named_apart(moe_checkpoint, tmp_path):
    assert (
        run(moe_checkpoint, tmp_path, "--task_name", "wnli", "--random_init", "--max_train_samples", "4") == 0
    )
    run_config = json.loads(
        (tmp_path / "tiny_moe_random_init" / "wnli" / "seed_42" / "run_config.json").read_text()
    )
    assert run_config["random_init"] is True and run_config["model_name"] == "tiny_moe_random_init"
    assert not (tmp_path / "tiny_moe").exists()


# ----------------------------------------------------------------------------------------------------------
# ELECTRA's fine-tuning: head, schedule, accumulation, STS-B targets, double_unordered
# ----------------------------------------------------------------------------------------------------------


def test_electra_head_is_cls_dropout_one_dense_layer(moe_checkpoint, tmp_path):
    _, model = load(moe_checkpoint, TASKS["rte"])
    assert model.config.classifier_head == "electra"
    head = model.classifier
    assert [name for name, _ in head.named_parameters()] == ["linear.weight", "linear.bias"]
    assert head.dropout.p == 0.1 and head.linear.in_features == TINY["hidden_size"]
    model.eval()
    input_ids = torch.randint(5, 100, (3, 6))
    with torch.no_grad():
        hidden = model.electra(input_ids).last_hidden_state
        expected = hidden[:, 0] @ head.linear.weight.T + head.linear.bias
        torch.testing.assert_close(model(input_ids).logits, expected)
    # The choice is saved in the config and a fine-tuned checkpoint keeps its own head.
    model.save_pretrained(tmp_path / "finetuned")
    config = json.loads((tmp_path / "finetuned" / "config.json").read_text())
    assert config["classifier_head"] == "electra"
    assert glue_model.choose_classifier_head(None, config) == "electra"
    _, hf = load(moe_checkpoint, TASKS["rte"], classifier_head="hf")
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= dict(hf.named_parameters()).keys()


def test_transformers_classification_checkpoint_keeps_its_head(tmp_path, vocab_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    path = tmp_path / "hf_finetuned"
    ElectraForSequenceClassification(
        ElectraConfig(vocab_size=tokenizer.vocab_size, num_labels=2, **TINY)
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    _, model = load(path, TASKS["rte"])
    assert type(model).__name__ == "ElectraForSequenceClassification"
    trained = load_file(path / "model.safetensors")["classifier.out_proj.weight"]
    assert torch.equal(model.classifier.out_proj.weight, trained)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """2 x 16 with accumulation makes the same update as one batch of 32 (SGD: the update is the gradient)."""
    config = ElectraMoEConfig(vocab_size=100, num_experts=2, top_k=1, num_labels=2, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, classifier_dropout=0.0, classifier_head="electra",
                              router_aux_loss_coef=0.0, router_z_loss_coef=0.0, **TINY)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(5, 100, (32, 8), generator=generator).tolist(),
            "labels": torch.randint(0, 2, (32,), generator=generator).tolist(),
        }
    )
    updated = {}
    for batch, steps in ((32, 1), (16, 2)):
        torch.manual_seed(0)
        model = modeling_electra.ElectraMoEForSequenceClassification(config)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(batch)), per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
            max_steps=1, optim="sgd", learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
            report_to="none", use_cpu=True, save_strategy="no",
        )  # fmt: skip
        trainer = glue_training.LayerwiseDecayTrainer(
            model=model, args=args, train_dataset=data, layerwise_lr_decay=1.0
        )
        trainer.train()
        updated[batch] = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, value in updated[32].items():
        torch.testing.assert_close(updated[16][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert modeling_electra.ElectraMoEForSequenceClassification.accepts_loss_kwargs is False


@pytest.mark.parametrize("schedule", ["electra", "linear"])
def test_learning_rate_schedule(schedule, tmp_path):
    model = modeling_electra.ElectraMoEForSequenceClassification(ElectraMoEConfig(vocab_size=100, **TINY))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1.0, warmup_steps=0.1, report_to="none")
    trainer = glue_training.LayerwiseDecayTrainer(
        model=model, args=args, layerwise_lr_decay=1.0, lr_schedule=schedule
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    rates = []
    for _ in range(100):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[5] == pytest.approx(0.5 * (0.95 if schedule == "electra" else 1.0))
    # ELECTRA decays over all steps; transformers' from the end of warmup (about 11% higher at 10% warmup).
    assert rates[50] == pytest.approx(0.5 if schedule == "electra" else 50 / 90)
    args = run_glue.parse_args(["--model_name_or_path", "x", "--task_name", "rte"])
    assert args.training.lr_schedule == "electra" and args.double_unordered
    assert args.training.gradient_accumulation_steps == 1


def test_stsb_targets_are_scaled_to_unit_range(moe_checkpoint):
    task = TASKS["stsb"]
    args = run_glue.parse_args(["--model_name_or_path", "x", "--task_name", "stsb", "--glue_dir", str(GLUE_FIXTURES),
                                "--no-double_unordered"])  # fmt: skip
    splits, _ = glue_training.load_splits(args, "stsb")
    tokenizer, _ = load(moe_checkpoint, task)
    raw, encoded = glue_training.encode_splits(args, task, splits, tokenizer, seed=1)
    for split in ("train", "validation"):
        assert max(raw[split]["label"]) > 1.0
        assert encoded[split]["label"] == pytest.approx([v / 5 for v in raw[split]["label"]])
    assert (
        run_glue.resolve_hyperparameters(args, "stsb", ElectraMoEConfig(vocab_size=9))["target_scale"] == 5.0
    )
    # Predictions (and labels, for the metrics) go back to 0-5.
    logits = np.array([[0.2], [0.9]])
    assert glue_training.predictions_from_logits(task, logits, 5.0) == pytest.approx([1.0, 4.5])
    metrics = glue_training.make_compute_metrics(task, 5.0)(EvalPrediction(logits, np.array([0.2, 0.9])))
    assert metrics["pearson"] == pytest.approx(1.0)
    assert glue_training.predictions_from_logits(TASKS["rte"], np.array([[0.2, 0.9]]), 5.0).tolist() == [1]
    # --no-scale_targets trains on the 0-5 scores, as runs before ELECTRA's scaling did.
    unscaled = run_glue.parse_args(["--model_name_or_path", "x", "--task_name", "stsb", "--no-scale_targets"])
    _, encoded = glue_training.encode_splits(unscaled, task, splits, tokenizer, seed=1)
    assert encoded["validation"]["label"] == pytest.approx(raw["validation"]["label"])
    assert (
        glue_training.target_scale(unscaled, task) == 1.0
        and glue_training.target_scale(args, TASKS["rte"]) == 1.0
    )


@pytest.mark.parametrize("task_name", ["mrpc", "stsb", "rte"])
def test_double_unordered_adds_swapped_pairs(task_name, moe_checkpoint):
    task = TASKS[task_name]
    argv = ["--model_name_or_path", "x", "--task_name", task_name, "--glue_dir", str(GLUE_FIXTURES),
            "--max_train_samples", "5"]  # fmt: skip
    tokenizer, _ = load(moe_checkpoint, task)
    splits, _ = glue_training.load_splits(run_glue.parse_args(argv), task_name)
    doubled, _ = glue_training.encode_splits(run_glue.parse_args(argv), task, splits, tokenizer, seed=1)
    single, _ = glue_training.encode_splits(
        run_glue.parse_args([*argv, "--no-double_unordered"]), task, splits, tokenizer, 1
    )
    first, second = task.text_columns
    if task_name == "rte":  # ELECTRA doubles MRPC and STS-B only
        assert doubled["train"][:] == single["train"][:]
        return
    train, original = doubled["train"], single["train"]
    assert len(train) == 10 and len(original) == 5
    assert train[:5] == original[:]
    assert train[5:][first] == original[second] and train[5:][second] == original[first]
    assert train[5:]["label"] == original["label"]


def test_help_shows_the_trainer_flags_with_their_defaults(capsys):
    """TrainingArguments' flags as transformers users know them, each with its default; unset recipe values."""
    with pytest.raises(SystemExit):
        run_glue.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--fp16", "--bf16", "--report_to", "--gradient_checkpointing", "--torch_compile", "--save_steps",
                 "--save_total_limit", "--logging_steps", "--dataloader_num_workers", "--seed SEED [SEED ...]"):  # fmt: skip
        assert flag in text, flag
    assert "(default: 0.1)" in text and "(default: 50)" in text and "(default: [42])" in text
    args = run_glue.parse_args(["--model_name_or_path", "x", "--task_name", "rte", "--learning_rate", "1e-4",
                                "--save_steps", "7", "--seed", "1", "2"])  # fmt: skip
    assert (args.training.learning_rate, args.training.num_train_epochs) == (1e-4, None)  # unset: by task
    assert (args.training.save_steps, args.training.seed) == (7, [1, 2])
