"""Continued pretraining: --init_discriminator_from (dense or upcycled) and --init_generator_from."""

import json
import os
import signal
import threading

import pytest
import torch
from transformers import AutoTokenizer

import run_state
import wikitext_trainer as wt
from conftest import write_vocab_dir
from input_checks import EXIT_BAD_INPUT
from modeling_electra import ElectraMoEConfig, ElectraMoEModel
from pretrain_utils import assert_same_weights, final_weights, read_metrics, trainer_argv
from upcycling import upcycle_dense_to_moe

# trainer_argv's tiny-model flags describe a fresh model; a continued run takes its shape from the checkpoint.
SIZE_FLAGS = {"--model_size", "--hidden_size", "--num_hidden_layers", "--num_attention_heads",
              "--intermediate_size", "--embedding_size"}  # fmt: skip


def continued_argv(root, tokenizer_dir, *extra, name="continued", cache=None):
    argv = trainer_argv(root, tokenizer_dir, *extra, name=name, cache=cache)
    kept = []
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag not in SIZE_FLAGS:
            kept += [flag, value]
    return kept


@pytest.fixture(scope="module")
def saved(tmp_path_factory, vocab_dir):
    """A finished tiny dense run (discriminator/, generator/) and an upcycled 4-expert copy of its encoder."""
    root = tmp_path_factory.mktemp("saved")
    assert wt.main(trainer_argv(root, vocab_dir, "--max_training_steps", "2", name="dense")) == 0
    dense = root / "out" / "dense"
    encoder = ElectraMoEModel.from_pretrained(dense / "discriminator")
    moe_config = ElectraMoEConfig(**{**encoder.config.to_dict(), "num_experts": 4, "top_k": 2,
                                     "norm_topk_prob": True})  # fmt: skip
    upcycled = root / "upcycled"
    upcycle_dense_to_moe(encoder, moe_config).save_pretrained(upcycled)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(upcycled)
    return dense, upcycled


def watch_models(monkeypatch):
    """Capture the (generator, discriminator) the trainer builds, with their weights at build time."""
    built = []
    build_models = wt.build_models

    def watching(*args):
        generator, discriminator = build_models(*args)
        copies = [{k: v.clone() for k, v in m.state_dict().items()} for m in (generator, discriminator)]
        built.append((generator, discriminator, *copies))
        return generator, discriminator

    monkeypatch.setattr(wt, "build_models", watching)
    return built


def encoder_weights(state: dict) -> dict:
    return {k[len("electra.") :]: v for k, v in state.items() if k.startswith("electra.")}


def test_the_discriminator_starts_from_a_dense_checkpoint_and_the_generator_is_derived(
    saved, tmp_path, monkeypatch
):
    dense, _ = saved
    built = watch_models(monkeypatch)
    argv = continued_argv(tmp_path, dense / "discriminator", "--init_discriminator_from",
                          str(dense / "discriminator"), "--max_training_steps", "2", "--seed", "7")  # fmt: skip
    assert wt.main(argv) == 0
    generator, discriminator, gen_start, disc_start = built[0]
    saved_disc = {k.split("/", 1)[1]: v for k, v in final_weights(dense).items() if k.startswith("disc")}
    saved_gen = {k.split("/", 1)[1]: v for k, v in final_weights(dense).items() if k.startswith("gen")}
    assert_same_weights(disc_start, saved_disc)  # every discriminator weight, head included
    # The generator: ELECTRA's size rule from the checkpoint's config, fresh weights, shared embeddings.
    assert generator.config.hidden_size == saved_generator_hidden(dense)
    fresh = [k for k in gen_start if "embeddings" not in k and "lm_head" not in k]
    assert fresh and all(not torch.equal(gen_start[k], saved_gen[k]) for k in fresh)
    assert generator.electra.embeddings is discriminator.electra.embeddings
    run_dir = tmp_path / "out" / "continued"
    assert json.loads((run_dir / "training_args.json").read_text())["init_discriminator_from"] == str(
        dense / "discriminator"
    )


def saved_generator_hidden(run_dir):
    return json.loads((run_dir / "generator" / "config.json").read_text())["hidden_size"]


def test_an_upcycled_checkpoint_trains_as_moe_and_the_generator_can_be_given(saved, tmp_path, monkeypatch):
    dense, upcycled = saved
    built = watch_models(monkeypatch)
    argv = continued_argv(tmp_path, upcycled, "--init_discriminator_from", str(upcycled), "--init_generator_from",
                          str(dense / "generator"), "--max_training_steps", "2")  # fmt: skip
    assert wt.main(argv) == 0
    generator, discriminator, gen_start, disc_start = built[0]
    assert discriminator.config.num_experts == 4 and discriminator.config.top_k == 2
    upcycled_encoder = ElectraMoEModel.from_pretrained(upcycled).state_dict()
    assert_same_weights(encoder_weights(disc_start), upcycled_encoder)
    saved_gen = {k.split("/", 1)[1]: v for k, v in final_weights(dense).items() if k.startswith("gen")}
    assert_same_weights(encoder_weights(gen_start), encoder_weights(saved_gen))
    assert generator.electra.embeddings is discriminator.electra.embeddings
    final = json.loads((tmp_path / "out" / "continued" / "discriminator" / "config.json").read_text())
    assert (final["num_experts"], final["top_k"]) == (4, 2)
    assert "expert_load" in read_metrics(tmp_path / "out" / "continued", "train")[0]


def test_an_expert_choice_checkpoint_keeps_its_capacity_factor_without_the_flag(saved, tmp_path, vocab_dir):
    """Training-time router settings come from the flags, but through the config's own defaults and checks."""
    dense, _ = saved
    encoder = ElectraMoEModel.from_pretrained(dense / "discriminator")
    ec_config = ElectraMoEConfig(**{**encoder.config.to_dict(), "num_experts": 4, "router_type": "expert_choice",
                                    "norm_topk_prob": True})  # fmt: skip
    upcycled = tmp_path / "upcycled-ec"
    upcycle_dense_to_moe(encoder, ec_config).save_pretrained(upcycled)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(upcycled)
    argv = continued_argv(
        tmp_path, upcycled, "--init_discriminator_from", str(upcycled), "--max_training_steps", "2"
    )
    assert wt.main(argv) == 0
    final = json.loads((tmp_path / "out" / "continued" / "discriminator" / "config.json").read_text())
    assert (final["router_type"], final["capacity_factor"], final["norm_topk_prob"]) == (
        "expert_choice",
        2.0,
        True,
    )


def test_resume_of_a_continued_run_matches_the_uninterrupted_one(saved, tmp_path, monkeypatch):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    _, upcycled = saved
    flags = ["--init_discriminator_from", str(upcycled), "--max_training_steps", "4", "--save_steps", "2"]
    assert wt.main(continued_argv(tmp_path, upcycled, *flags, name="straight")) == 0
    write_metrics = run_state.write_metrics

    def signal_after_step_2(run_dir, record):
        write_metrics(run_dir, record)
        if record["step"] == 2 and record["split"] == "train":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_state, "write_metrics", signal_after_step_2)
    argv = continued_argv(tmp_path, upcycled, *flags, name="resumed")
    assert wt.main(argv) == run_state.REQUEUE_EXIT_CODE
    monkeypatch.setattr(run_state, "write_metrics", write_metrics)
    assert wt.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    out = tmp_path / "out"
    assert_same_weights(final_weights(out / "resumed"), final_weights(out / "straight"))


def other_vocabularies(tmp_path):
    bigger = write_vocab_dir(tmp_path / "bigger")
    (bigger / "vocab.txt").write_text((bigger / "vocab.txt").read_text() + "zebra\n")
    swapped = write_vocab_dir(tmp_path / "swapped")
    lines = (swapped / "vocab.txt").read_text().split()
    lines[-1], lines[-2] = lines[-2], lines[-1]
    (swapped / "vocab.txt").write_text("\n".join(lines) + "\n")
    return {"bigger": (bigger, "has a vocabulary of"), "swapped": (swapped, "vocabulary differs")}


@pytest.mark.parametrize("case", ["bigger", "swapped", "architecture flag", "no checkpoint"])
def test_bad_init_flags_exit_2_with_a_message_and_create_nothing(saved, tmp_path, capsys, case):
    dense, _ = saved
    disc = dense / "discriminator"
    init = ["--init_discriminator_from", str(disc)]
    cases = {name: (continued_argv(tmp_path, vocab, *init), message)
             for name, (vocab, message) in other_vocabularies(tmp_path).items()}  # fmt: skip
    cases["architecture flag"] = (
        continued_argv(tmp_path, disc, *init, "--num_experts", "4"),
        "--num_experts",
    )
    cases["no checkpoint"] = (
        continued_argv(tmp_path, disc, "--init_discriminator_from", str(tmp_path / "nothing")),
        "no config.json",
    )
    argv, message = cases[case]
    with pytest.raises(SystemExit) as exit_info:
        wt.main(argv)
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "--init_discriminator_from" in err, err
    assert not (tmp_path / "out").exists()
