"""score_rtd.py: one fixed RTD evaluation set, built once from a reference run; any discriminator scored on it."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForPreTraining, AutoTokenizer

import score_rtd
import wikitext_trainer as wt
from pretrain_utils import assert_same_weights, final_weights, read_metrics, trainer_argv
from rtd import max_predictions_per_seq
from upcycling import upcycle_dense_to_moe

SHORT_STEPS, LONG_STEPS = 1, 40


@pytest.fixture(scope="session")
def runs(tmp_path_factory, vocab_dir):
    """Two tiny pretraining runs on the fixture corpus: 1 step and 40 steps (same data, seed, recipe)."""
    root = tmp_path_factory.mktemp("score_rtd")
    for name, steps in (("short", SHORT_STEPS), ("long", LONG_STEPS)):
        flags = ["--max_training_steps", str(steps), "--learning_rate", "1e-3", "--eval_steps", "1000"]
        flags += ["--save_steps", "1000", "--logging_steps", "1000"]
        assert wt.main(trainer_argv(root, vocab_dir, *flags, name=name, cache=root / "cache")) == 0
    return root / "out"


@pytest.fixture(scope="session")
def eval_set(runs, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_set") / "rtd_eval.npz"
    assert score_rtd.main(["--eval_set", str(path), "--reference_run", str(runs / "long")]) == 0
    return path


def score(eval_set, output, *models):
    argv = ["--eval_set", str(eval_set), "--discriminators", *map(str, models), "--output", str(output)]
    assert score_rtd.main(argv) == 0
    return {record["model"]: record for record in json.loads(output.read_text())["models"]}


def test_eval_set_holds_both_corruptions_on_the_same_positions(eval_set, tokenizer):
    arrays, meta = score_rtd.load_eval_set(eval_set)
    ids, chosen = arrays["input_ids"], arrays["chosen"]
    real = ids != tokenizer.pad_token_id
    assert meta["examples"] == len(ids) and meta["pad_token_id"] == tokenizer.pad_token_id
    assert meta["vocabulary"] == score_rtd.vocabulary_fingerprint(tokenizer)
    never = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id]
    assert not (chosen & ~real).any() and not np.isin(ids[chosen], never).any()
    # ELECTRA's count per sequence: round(15% of the real tokens), at least 1, at most its cap.
    expected = np.clip(np.round(real.sum(1) * 0.15), 1, max_predictions_per_seq(ids.shape[1]))
    assert (chosen.sum(1) == expected).all()
    for kind in score_rtd.CORRUPTIONS:
        corrupted, replaced = arrays[f"{kind}_input_ids"], arrays[f"{kind}_replaced"]
        assert (corrupted[~chosen] == ids[~chosen]).all()
        assert (replaced == (corrupted != ids)).all() and not (replaced & ~chosen).any()
    assert not np.isin(arrays["uniform_input_ids"][chosen], tokenizer.all_special_ids).any()
    assert arrays["uniform_replaced"][chosen].mean() > 0.9  # a uniform draw rarely hits the original
    assert not np.array_equal(arrays["generator_input_ids"], arrays["uniform_input_ids"])


def test_same_model_scores_the_same_and_longer_training_scores_better(eval_set, runs, tmp_path):
    before = eval_set.read_bytes()
    first = score(eval_set, tmp_path / "a.json", runs / "short", runs / "long")
    again = score(eval_set, tmp_path / "b.json", runs / "long" / "discriminator")
    assert eval_set.read_bytes() == before, "an existing evaluation set is reused, never rebuilt"
    assert again[str(runs / "long" / "discriminator")]["generator"] == first[str(runs / "long")]["generator"]
    short, long = first[str(runs / "short")], first[str(runs / "long")]
    for kind in score_rtd.CORRUPTIONS:
        assert long[kind]["rtd_loss"] < short[kind]["rtd_loss"] - 0.02, kind
        assert long[kind]["auc"] > short[kind]["auc"] + 0.1, kind
        assert long[kind]["accuracy"] > short[kind]["accuracy"], kind
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert rows[0].startswith("model,corruption,rtd_loss,accuracy,auc") and len(rows) == 1 + 2 * 2


def test_moe_discriminator_gets_router_and_spread_per_layer(eval_set, runs, tmp_path):
    dense = AutoModelForPreTraining.from_pretrained(runs / "long" / "discriminator")
    config = dense.config.to_dict() | {"num_experts": 4, "top_k": 2, "norm_topk_prob": True}
    config = type(dense.config)(
        **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )
    for method in ("copy", "drop"):
        upcycle_dense_to_moe(dense, config, method=method, seed=1).save_pretrained(tmp_path / method)
    scores = score(eval_set, tmp_path / "moe.json", runs / "long", tmp_path / "copy", tmp_path / "drop")
    copy, drop = scores[str(tmp_path / "copy")], scores[str(tmp_path / "drop")]
    assert copy["expert_spread"] == [0.0, 0.0] and min(drop["expert_spread"]) > 0.3
    assert copy["upcycling"]["method"] == "copy" and drop["upcycling"]["method"] == "drop"
    for kind in score_rtd.CORRUPTIONS:
        # Copies with renormalised gates compute the dense function on real tokens.
        assert copy[kind]["rtd_loss"] == pytest.approx(scores[str(runs / "long")][kind]["rtd_loss"], abs=1e-5)
        assert len(copy[kind]["router_entropy"]) == 2
        assert 0 < min(copy[kind]["router_entropy"]) <= max(copy[kind]["router_entropy"]) <= np.log(4) + 1e-6
        loads = np.array(copy[kind]["expert_load"])
        assert loads.shape == (2, 4) and np.allclose(loads.sum(1), 1.0, atol=1e-5)
    assert "router_entropy" not in scores[str(runs / "long")]["generator"]


def test_detection_scores_known_answers():
    logits = np.array([2.0, -1.0, 0.5, -3.0, 1.0], dtype=np.float32)
    labels = np.array([1, 0, 0, 1, 1])
    scores = score_rtd.detection_scores(logits, labels)
    # predicted replaced: 0, 2, 4; actual: 0, 3, 4 -> tp 2, precision 2/3, recall 2/3.
    assert scores["accuracy"] == pytest.approx(3 / 5) and scores["f1"] == pytest.approx(2 / 3)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    # Pairs (replaced, original) ranked right: (2.0 > -1, 0.5), (-3 < both), (1.0 > both) -> 4 of 6.
    assert scores["auc"] == pytest.approx(4 / 6)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(labels).float()
    )
    assert scores["rtd_loss"] == pytest.approx(expected.item())


def test_bad_inputs_exit_2_and_write_nothing(eval_set, runs, tmp_path, capsys):
    missing = tmp_path / "new.npz"
    assert score_rtd.main(["--eval_set", str(missing)]) == 2
    assert "--reference_run" in capsys.readouterr().err and not missing.exists()
    assert score_rtd.main(["--eval_set", str(missing), "--reference_run", str(tmp_path)]) == 2
    assert "training_args.json" in capsys.readouterr().err and not missing.exists()
    out = tmp_path / "scores.json"
    argv = ["--eval_set", str(eval_set), "--discriminators", str(runs / "long"), str(tmp_path), "--output"]
    assert score_rtd.main([*argv, str(out)]) == 2
    assert "error: --discriminators" in capsys.readouterr().err and not out.exists()
    (tmp_path / "bogus.npz").write_text("not numpy")
    assert score_rtd.main(["--eval_set", str(tmp_path / "bogus.npz")]) == 2
    assert "not an evaluation set" in capsys.readouterr().err


def test_trainer_scores_the_fixed_set_at_every_evaluation(eval_set, runs, vocab_dir, tmp_path, capsys):
    """wikitext_trainer.py --fixed_eval_set logs fixed_* metrics; at the last step they are score_rtd.py's."""
    flags = ["--max_training_steps", "4", "--eval_steps", "2", "--fixed_eval_set", str(eval_set)]
    cache = runs.parent / "cache"
    assert wt.main(trainer_argv(tmp_path, vocab_dir, *flags, name="fixed", cache=cache)) == 0
    run_dir = tmp_path / "out" / "fixed"
    validation = read_metrics(run_dir, "validation")
    assert [r["step"] for r in validation] == [2, 4]
    assert validation[0]["fixed_generator_auc"] != validation[1]["fixed_generator_auc"]
    final = score(eval_set, tmp_path / "final.json", run_dir)[str(run_dir)]
    for kind in score_rtd.CORRUPTIONS:
        for name in ("rtd_loss", "auc", "f1"):
            assert validation[1][f"fixed_{kind}_{name}"] == pytest.approx(final[kind][name], abs=1e-6)
    # Scoring takes no randomness and restores train mode: the run trains exactly as it would without it.
    assert wt.main(trainer_argv(tmp_path, vocab_dir, *flags[:4], name="plain", cache=cache)) == 0
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "out" / "plain"))
    bad = trainer_argv(
        tmp_path, vocab_dir, "--fixed_eval_set", str(tmp_path / "no.npz"), name="x", cache=cache
    )
    with pytest.raises(SystemExit) as exit_info:
        wt.main(bad)
    assert exit_info.value.code == 2 and "--fixed_eval_set" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# bench/expert_tokens.py: what each expert sees, on the evaluation set's original text
# ---------------------------------------------------------------------------------------------------------


def test_expert_statistics_known_answers():
    from bench import expert_tokens

    vocab = ["[CLS]", "the", ",", "7"]
    kinds = {
        "frequent": np.array([0, 1, 0, 0], bool), "rare": np.array([0, 0, 0, 1], bool),
        "punctuation": np.array([0, 0, 1, 0], bool), "number": np.array([0, 0, 0, 1], bool),
        "cls": np.array([1, 0, 0, 0], bool), "sep": np.zeros(4, bool),
    }  # fmt: skip
    tokens = np.array([0, 1, 1, 1, 1, 1, 2, 3])  # top-1: expert 1 takes the punctuation and the number
    experts = np.array([0, 0, 0, 0, 0, 0, 1, 1])[:, None]
    rows = expert_tokens.expert_statistics(tokens, experts, 2, kinds, vocab)
    assert [r["token_share"] for r in rows] == [0.75, 0.25]
    assert rows[1]["share_punctuation"] == 0.5 and rows[1]["corpus_punctuation"] == 1 / 8
    assert rows[1]["lift_punctuation"] == 4.0 and rows[0]["lift_punctuation"] == 0.0
    assert rows[0]["lift_frequent"] == pytest.approx((5 / 6) / (5 / 8))
    assert rows[0]["top_tokens"].split()[0] == "the" and rows[0]["distinctive_tokens"] == "the"


def test_token_kinds_split_the_text_by_frequency(tokenizer):
    from bench import expert_tokens

    the, cat, comma, seven = tokenizer.convert_tokens_to_ids(["the", "cat", ",", "7"])
    text = np.array([the] * 10 + [cat] * 8 + [comma] + [seven] + [tokenizer.cls_token_id] * 20)
    kinds = expert_tokens.token_kinds(tokenizer, text)
    assert (
        kinds["frequent"][the]
        and not kinds["frequent"][cat]
        and not kinds["frequent"][tokenizer.cls_token_id]
    )
    assert kinds["rare"][seven] and not kinds["rare"][the]  # the last 10% of the 20 non-special tokens
    assert kinds["punctuation"][comma] and kinds["number"][seven] and kinds["cls"][tokenizer.cls_token_id]


def test_expert_tokens_on_a_drop_upcycled_model(eval_set, runs, tmp_path, capsys):
    from bench import expert_tokens

    dense = AutoModelForPreTraining.from_pretrained(runs / "long" / "discriminator")
    config = dense.config.to_dict() | {"num_experts": 4, "top_k": 2}
    config = type(dense.config)(
        **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )
    model = upcycle_dense_to_moe(dense, config, method="drop", seed=2)
    model.save_pretrained(tmp_path / "moe")
    AutoTokenizer.from_pretrained(runs / "long" / "discriminator").save_pretrained(tmp_path / "moe")
    out = tmp_path / "tokens.csv"
    argv = ["--eval_set", str(eval_set), "--models", str(tmp_path / "moe"), "--output", str(out)]
    assert expert_tokens.main([*argv, "--figure_dir", str(tmp_path / "figures")]) == 0
    assert [p.name for p in (tmp_path / "figures").iterdir()] == [f"expert_tokens_{tmp_path.name}_moe.png"]
    table = pd.read_csv(out)
    assert sorted(table["layer"].unique()) == [0, 1] and len(table) == 2 * 4
    # The token shares are the expert load the model reports on the same text.
    arrays, _ = score_rtd.load_eval_set(eval_set)
    ids = torch.as_tensor(arrays["input_ids"], dtype=torch.long)
    real = ids != 0
    with torch.no_grad():
        load = model.eval()(
            ids, attention_mask=real.long(), token_type_ids=torch.as_tensor(arrays["token_type_ids"]).long()
        ).expert_load
    for layer in (0, 1):
        shares = table[table["layer"] == layer].sort_values("expert")["token_share"].to_numpy()
        np.testing.assert_allclose(shares, load[layer].numpy(), atol=1e-6)
    assert (table["corpus_cls"] > 0).all() and table["top_tokens"].notna().all()
    assert (
        expert_tokens.main(
            ["--eval_set", str(eval_set), "--models", str(runs / "long"), "--output", str(out)]
        )
        == 2
    )
    assert "dense" in capsys.readouterr().err


def test_notebook_cell_draws_the_expert_token_heatmaps(eval_set, runs, tmp_path):
    """The notebook's expert-token cell, run on bench/expert_tokens.py's CSV (the whole notebook runs in
    tests/test_notebook.py, without the CSV)."""
    import matplotlib
    import nbformat

    import run_study
    from bench import expert_tokens

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = AutoModelForPreTraining.from_pretrained(runs / "long" / "discriminator")
    config = dense.config.to_dict() | {"num_experts": 4, "top_k": 2}
    config = type(dense.config)(
        **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )
    upcycle_dense_to_moe(dense, config, method="drop", seed=3).save_pretrained(tmp_path / "run" / "moe")
    AutoTokenizer.from_pretrained(runs / "long" / "discriminator").save_pretrained(tmp_path / "run" / "moe")
    csv = tmp_path / "tokens.csv"
    argv = ["--eval_set", str(eval_set), "--models", str(tmp_path / "run" / "moe"), "--output", str(csv)]
    assert expert_tokens.main(argv) == 0
    notebook = nbformat.read(run_study.NOTEBOOK, as_version=4)
    (cell,) = [c for c in notebook.cells if c.source.startswith("if EXPERT_TOKENS_CSV is None")]
    figures = []
    namespace = {"EXPERT_TOKENS_CSV": str(csv), "EXPERT_TOKENS_KIND": "frequent", "pd": pd, "np": np}
    namespace |= {"plt": plt, "Path": Path, "save": lambda fig, name: figures.append((fig, name))}
    exec(cell.source, namespace)
    ((fig, name),) = figures
    assert name == "expert_tokens_run_moe"
    share, lift = (ax.images[0].get_array() for ax in fig.axes[:2])
    table = pd.read_csv(csv)
    assert share.shape == (2, 4) and np.allclose(share.sum(1), 1.0)
    expected = np.log2(table.sort_values(["layer", "expert"])["lift_frequent"].clip(1 / 8, 8).to_numpy())
    np.testing.assert_allclose(np.asarray(lift).reshape(-1), expected)
    plt.close(fig)
