"""WikiText preprocessing for pretraining: articles, [CLS] ... [SEP] blocks, the on-disk cache, bad inputs."""

import json
import logging
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

import pretrain_data
import pretrain_documents
import wikitext_trainer as wt
from input_checks import EXIT_BAD_INPUT
from pretrain_utils import SEQ_LEN, TRAIN_FILE, VALID_FILE, trainer_argv

WIKITEXT_SAMPLE = [
    "",
    " = Valkyria Chronicles = ",
    "",
    " The game was released in 2011 . It is a first @-@ person game . ",
    "",
    " = = Plot = = ",
    "",
    " The story of the war , with 1 @,@ 000 actors and a 2 @.@ 5 hour film . ",
    " = = = Music = = = ",
    " The album has three songs . ",
    "",
    " = The River = ",
    " The river ran fast . ",
]


def test_wikitext_lines_are_grouped_into_articles():
    articles = list(pretrain_documents.group_into_articles(WIKITEXT_SAMPLE))
    assert len(articles) == 2, "sub-headings (= = x = =) must not start an article"
    first = articles[0].split("\n")
    assert first[0] == "Valkyria Chronicles"
    assert "first-person" in first[1], "WikiText's @-@ joiner is undone"
    assert first[2] == "Plot" and first[4] == "Music", "sub-heading words stay in the article"
    assert "1,000" in first[3] and "2.5" in first[3]
    assert articles[1] == "The River\nThe river ran fast ."


def test_blocks_are_cls_text_sep_cut_from_the_joined_articles(tokenizer):
    articles = list(pretrain_documents.group_into_articles(TRAIN_FILE.read_text().splitlines()))
    blocks = pretrain_data.tokenize_into_blocks({"text": articles}, tokenizer, SEQ_LEN)["input_ids"]
    assert len(blocks) > 100
    assert all(
        len(b) == SEQ_LEN and b[0] == tokenizer.cls_token_id and b[-1] == tokenizer.sep_token_id
        for b in blocks
    )

    stream = []
    for article in articles:
        stream += tokenizer(article, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    body = [token for block in blocks for token in block[1:-1]]
    assert body == stream[: len(body)], "blocks must be consecutive pieces of the article stream"
    assert len(stream) - len(body) < SEQ_LEN - 2, "only the last partial block may be dropped"
    assert tokenizer.unk_token_id not in body, "the fixture corpus must be covered by the tiny vocabulary"


def test_the_tokenized_cache_is_reused_and_keyed_on_the_data(tmp_path, tokenizer, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pretrain_data")
    train = tmp_path / "train.txt"
    train.write_text(TRAIN_FILE.read_text())
    args = wt.parse_args(trainer_argv(tmp_path, tmp_path, "--train_file", str(train)))
    first = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    assert first["train"]["input_ids"].shape[1] == SEQ_LEN and first["train"]["input_ids"].dtype == np.int32
    assert len(first["validation"]) > 0

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the raw data was loaded again despite a matching cache")

    monkeypatch.setattr(pretrain_data, "load_raw_splits", no_tokenizing)
    caplog.clear()
    second = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    assert "Reusing tokenized data cache" in caplog.text
    for split in ("train", "validation"):
        assert first[split].keys() == second[split].keys() == {"input_ids", "token_type_ids"}
        for column in first[split]:
            assert np.array_equal(first[split][column], second[split][column])

    monkeypatch.undo()
    with open(train, "a") as handle:
        handle.write(" = A New Article = \n the cat sat on the mat . \n")
    changed = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    count = pretrain_data.num_examples
    assert count(changed["train"]) + count(changed["validation"]) >= count(first["train"]) + count(
        first["validation"]
    )
    assert len(list((tmp_path / "cache").glob("blocks-*"))) == 2, "an edited file must get a new cache entry"

    args.example_format = "packed"
    packed = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    assert len(list((tmp_path / "cache").glob("blocks-*"))) == 3, "the example format must key the cache"
    assert packed["train"].keys() == {"input_ids"}


def test_without_a_validation_file_a_share_of_train_is_held_out(tmp_path, tokenizer):
    args = wt.parse_args(trainer_argv(tmp_path, tmp_path, "--validation_split_percentage", "10"))
    args.validation_file = None
    blocks = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    train, validation = blocks["train"]["input_ids"], blocks["validation"]["input_ids"]
    total = len(train) + len(validation)
    assert abs(len(validation) - 0.1 * total) <= 1
    train_rows = {row.tobytes() for row in train}
    assert not any(row.tobytes() in train_rows for row in validation)


def bad_inputs(tmp_path):
    """(flags, message) for each bad input; every case must stop before a model is built."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(" = Cat = \n the cat sat . \n")
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text(
        "".join(json.dumps({"sentence": "the cat sat on the mat ."}) + "\n" for _ in range(50))
    )
    missing = tmp_path / "missing.txt"
    return {
        "missing train file": (["--train_file", str(missing)], "does not exist"),
        "missing validation file": (["--validation_file", str(missing)], "does not exist"),
        "empty file": (["--train_file", str(empty)], "is empty"),
        "no text column": (
            ["--train_file", str(no_text), "--validation_file", str(no_text)],
            "no column 'text'",
        ),
        "smaller than one block": (
            ["--train_file", str(tiny), "--example_format", "packed"],
            "smaller than one block",
        ),
        "fewer examples than a batch": (["--train_file", str(tiny)], "fewer than one optimizer step"),
        "tokenizer not found": (
            ["--tokenizer_name", str(tmp_path / "no-tokenizer")],
            "could not load tokenizer",
        ),
        "bad MoE config": (["--num_experts", "4", "--top_k", "5"], "top_k"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing train file",
        "missing validation file",
        "empty file",
        "no text column",
        "smaller than one block",
        "fewer examples than a batch",
        "tokenizer not found",
        "bad MoE config",
    ],
)
def test_bad_input_exits_with_a_message_before_any_model_is_built(
    case, tmp_path, vocab_dir, monkeypatch, capsys
):
    flags, message = bad_inputs(tmp_path)[case]

    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built despite bad input")

    monkeypatch.setattr(wt, "build_models", must_not_build)
    with pytest.raises(SystemExit) as exit_info:
        wt.main(trainer_argv(tmp_path, vocab_dir, *flags))
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "run").exists(), "bad input must not leave an output directory"


def test_train_tokenizer_builds_a_vocabulary_and_saves_it_with_the_model(tmp_path, vocab_dir):
    vocab_size = 150
    argv = trainer_argv(
        tmp_path, vocab_dir, "--train_tokenizer", str(vocab_size), "--max_training_steps", "2"
    )
    argv += ["--tokenizer_name", "google/electra-base-discriminator"]  # unreachable offline: must not be used
    assert wt.main(argv) == 0
    disc_dir = tmp_path / "out" / "run" / "discriminator"
    tokenizer = AutoTokenizer.from_pretrained(str(disc_dir))
    assert 50 < len(tokenizer) <= vocab_size
    assert json.loads((disc_dir / "config.json").read_text())["vocab_size"] == len(tokenizer)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.cls_token == "[CLS]"
    assert tokenizer.tokenize("the war") == ["the", "war"], "frequent corpus words become whole tokens"
    assert os.path.isfile(tmp_path / "out" / "run" / "generator" / "tokenizer_config.json")


def test_valid_file_is_used_as_given(tmp_path, vocab_dir, tokenizer):
    articles = list(pretrain_documents.group_into_articles(VALID_FILE.read_text().splitlines()))
    args = wt.parse_args(trainer_argv(tmp_path, vocab_dir, "--example_format", "packed"))
    blocks = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    expected = pretrain_data.tokenize_into_blocks({"text": articles}, tokenizer, SEQ_LEN)["input_ids"]
    assert np.asarray(blocks["validation"]["input_ids"]).tolist() == expected

    args = wt.parse_args(trainer_argv(tmp_path, vocab_dir))
    blocks = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    indices = list(range(len(articles)))
    expected = pretrain_data.tokenize_into_examples({"text": articles}, indices, tokenizer, SEQ_LEN)
    assert {name: np.asarray(array).tolist() for name, array in blocks["validation"].items()} == {
        name: expected[name] for name in ("input_ids", "token_type_ids")
    }


def test_ranks_together_see_the_single_process_global_batches():
    single = pretrain_data.epoch_batches(103, batch_size=8, epoch=1, seed=42)
    ranks = [
        pretrain_data.epoch_batches(103, batch_size=4, epoch=1, seed=42, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single):
        together = np.concatenate([ranks[0][step], ranks[1][step]])
        assert sorted(together.tolist()) == sorted(batch.tolist())
    assert not set(np.concatenate(ranks[0]).tolist()) & set(np.concatenate(ranks[1]).tolist())
