"""Documents from every layout, sentences, data_stats.json, the memory-mapped reader, the size presets and the
load-balancing-loss convention."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_data
import pretrain_documents
import wikitext_trainer as wt
from input_checks import EXIT_BAD_INPUT
from pretrain_utils import SEQ_LEN, trainer_argv

# Three documents with disjoint words, two sentences each (a sentence ends at " ."/"!").
DOCUMENTS = [
    "the cat sat on the mat . the dog ran fast !",
    "john wrote a small red book . mary read his book .",
    "the king saw the church in the city . music of the world .",
]
SENTENCES_PER_DOCUMENT = 2


def document_vocabularies(tokenizer) -> list[set[int]]:
    return [set(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in DOCUMENTS]


def write_layout(directory, layout: str, copies: int) -> tuple[list, int]:
    """`copies` repetitions of DOCUMENTS in one layout; returns (flags, documents written)."""
    docs = DOCUMENTS * copies
    if layout == "jsonl":
        path = directory / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    elif layout == "blank_lines":  # BERT/ELECTRA text: a sentence per line, a blank line between documents
        path = directory / "corpus.txt"
        path.write_text("\n\n".join(doc.replace(" . ", " .\n") for doc in docs) + "\n")
    elif layout == "rows_txt":  # one document per line
        path = directory / "corpus.txt"
        path.write_text("\n".join(docs) + "\n")
    else:  # WikiText: a heading per article, one paragraph per line, blank lines around
        path = directory / "corpus.tokens"
        path.write_text("".join(f" \n = Title = \n \n {doc} \n \n" for doc in docs))
    return ["--train_file", str(path), "--validation_file", str(path)], len(docs)


EXPECTED_FORMAT = {"jsonl": "rows", "blank_lines": "blank_lines", "rows_txt": "rows", "wikitext": "wikitext"}


@pytest.mark.parametrize("layout", sorted(EXPECTED_FORMAT))
def test_each_layout_gives_its_documents_sentences_and_every_token(layout, tmp_path, tokenizer):
    flags, count = write_layout(tmp_path, layout, copies=10)
    args = wt.parse_args(trainer_argv(tmp_path, tmp_path, *flags))
    blocks = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    stats = blocks["data_stats"]["train"]
    assert stats["document_format"] == EXPECTED_FORMAT[layout], "auto must infer the layout"
    assert stats["documents"] == count
    # WikiText's titles are a sentence of their own
    assert stats["sentences"] == count * (SENTENCES_PER_DOCUMENT + (layout == "wikitext"))
    assert stats["kept_fraction"] == 1.0 and stats["tokens_in_examples"] == stats["tokens"] > 0
    assert stats["examples"] == pretrain_data.num_examples(blocks["train"])
    assert stats["segmenter"] == "sentencex" and stats["segmenter_version"]
    vocabularies = document_vocabularies(tokenizer)
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    for row in blocks["train"]["input_ids"]:
        words = set(row.tolist()) - special
        if layout == "wikitext":  # the title is the article's own first sentence
            words -= set(tokenizer("title", add_special_tokens=False)["input_ids"])
        assert any(words <= vocabulary for vocabulary in vocabularies), "an example crosses documents"


def test_auto_format_reasons_and_an_explicit_format(tokenizer):
    choose = pretrain_documents.choose_document_format
    assert choose("auto", "json", ["a", ""])[0] == "rows"
    assert choose("auto", "text", [" = Title = ", " a b ."])[0] == "wikitext"
    assert choose("auto", "hub", ["a .", "", "b ."])[0] == "blank_lines"
    assert choose("auto", "text", ["a .", "b ."])[0] == "rows"
    assert choose("rows", "text", [" = Title = "]) == ("rows", "--document_format")
    assert list(pretrain_documents.group_at_blank_lines(["a", "b", " ", "", "c", ""])) == ["a\nb", "c"]
    sentences = pretrain_documents.split_sentences("He went to the U.S. in 1990. Dr. Smith left!\nA new line")
    assert sentences == ["He went to the U.S. in 1990.", "Dr. Smith left!", "A new line"]


def test_packed_blocks_are_unchanged_and_report_their_kept_fraction(tmp_path, tokenizer):
    flags, count = write_layout(tmp_path, "wikitext", copies=10)
    args = wt.parse_args(trainer_argv(tmp_path, tmp_path, *flags, "--example_format", "packed"))
    blocks = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    stats = blocks["data_stats"]["train"]
    lines = Path(flags[1]).read_text().splitlines()
    articles = list(pretrain_documents.group_into_articles(lines))
    expected = pretrain_data.tokenize_into_blocks({"text": articles}, tokenizer, SEQ_LEN)["input_ids"]
    assert np.asarray(blocks["validation"]["input_ids"]).tolist() == expected
    assert stats["documents"] == count and stats["sentences"] is None
    body = sum(len(b) - 2 - b[1:-1].count(tokenizer.sep_token_id) for b in expected)
    assert stats["tokens_in_examples"] == body and 0.5 < stats["kept_fraction"] < 1.0


@pytest.mark.parametrize("example_format", ["electra", "packed"])
def test_several_files_and_globs_make_one_split(tmp_path, tokenizer, example_format):
    for part in range(3):
        records = [{"text": doc} for doc in DOCUMENTS * 4] + [{"text": None}, {"text": " "}]  # not documents
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    argv = trainer_argv(tmp_path, tmp_path, "--train_file", str(tmp_path / "part*.jsonl"))
    argv += ["--validation_file", str(tmp_path / "part0.jsonl"), str(tmp_path / "part1.jsonl")]
    argv += ["--example_format", example_format]
    args = wt.parse_args(argv)
    assert args.train_file == [str(tmp_path / f"part{part}.jsonl") for part in range(3)]
    blocks = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    assert blocks["data_stats"]["train"]["documents"] == 3 * 4 * len(DOCUMENTS)
    assert blocks["data_stats"]["validation"]["documents"] == 2 * 4 * len(DOCUMENTS)


def test_mixed_file_kinds_are_a_usage_error(tmp_path, vocab_dir, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "the cat ."}) + "\n")
    (tmp_path / "b.txt").write_text("the cat .\n")
    argv = trainer_argv(
        tmp_path, vocab_dir, "--train_file", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")
    )
    with pytest.raises(SystemExit) as exit_info:
        wt.main(argv)
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert "--train_file mixes file kinds" in capsys.readouterr().err


def copied_columns(dataset, width):
    """What training used before the memory-mapped reader: each column copied into one NumPy array."""
    return {
        name: dataset.data.column(name)
        .combine_chunks()
        .flatten()
        .to_numpy(zero_copy_only=False)
        .reshape(-1, width)
        for name in dataset.column_names
    }


def test_the_memory_mapped_reader_gives_the_batches_of_the_copied_arrays(tmp_path, tokenizer):
    import datasets

    flags, _ = write_layout(tmp_path, "wikitext", copies=40)
    args = wt.parse_args(trainer_argv(tmp_path, tmp_path, *flags))
    blocks = pretrain_data.prepare_blocks(args, tokenizer, pretrain_data.describe_data_source(args))
    cache = next((tmp_path / "cache").glob("blocks-*"))
    dataset = datasets.load_from_disk(str(cache))["train"]
    dataset.save_to_disk(str(tmp_path / "sharded"), num_shards=3)  # as several workers' files: 3 chunks
    sharded = datasets.load_from_disk(str(tmp_path / "sharded"))
    assert len(sharded.data.column("input_ids").chunks) >= 3
    copied = copied_columns(dataset, SEQ_LEN)
    for mapped in (blocks["train"], pretrain_data.mapped_columns(sharded, SEQ_LEN)):
        for column in mapped.values():  # views into the memory-mapped files, not copies
            assert all(not chunk.flags.owndata and not chunk.flags.writeable for chunk in column.chunks)
        for epoch in range(2):
            for indices in pretrain_data.epoch_batches(len(dataset), 8, epoch, seed=42):
                got = pretrain_data.batch_tensors(mapped, indices)
                for name, array in copied.items():
                    assert torch.equal(got[name], torch.as_tensor(array[indices], dtype=torch.long))
        head = mapped["input_ids"][50:57]
        assert len(head) == 7 and np.array_equal(head[np.arange(7)], copied["input_ids"][50:57])
        assert np.array_equal(mapped["input_ids"][len(dataset) - 1], copied["input_ids"][-1])
        with pytest.raises(IndexError):
            mapped["input_ids"][[len(dataset)]]


@pytest.mark.parametrize(
    "size, learning_rate, mask_prob",
    [("tiny", 5e-4, 0.15), ("small", 5e-4, 0.15), ("base", 2e-4, 0.15), ("large", 2e-4, 0.25)],
)
def test_each_preset_takes_electras_learning_rate_and_mask_prob(size, learning_rate, mask_prob):
    args = wt.parse_args(["--model_size", size])
    assert (args.learning_rate, args.mask_prob) == (learning_rate, mask_prob)
    args = wt.parse_args(["--model_size", size, "--learning_rate", "1e-3", "--mask_prob", "0.2"])
    assert (args.learning_rate, args.mask_prob) == (1e-3, 0.2), "explicit flags win"


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_aux_loss_is_transformers_load_balancing_loss_over_top_k(top_k):
    """Shares over all top-k slots (summing to 1): transformers' value (shares per rank, summing to k) / k."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from test_modeling import make_block

    block = make_block(num_experts=6, top_k=top_k)
    hidden = torch.randn(3, 7, block.router.weight.shape[1], generator=torch.Generator().manual_seed(top_k))
    _, router = block(hidden)
    theirs = mixtral.load_balancing_loss_func((router.logits,), num_experts=6, top_k=top_k)
    torch.testing.assert_close(router.aux_loss * top_k, theirs)


def test_the_trainer_writes_data_stats_into_the_run_folder(tmp_path, vocab_dir):
    flags, count = write_layout(tmp_path, "jsonl", copies=30)
    argv = trainer_argv(tmp_path, vocab_dir, *flags, "--max_training_steps", "1", "--train_tokenizer", "120")
    assert wt.main(argv) == 0
    stats = json.loads((tmp_path / "out" / "run" / "data_stats.json").read_text())
    assert stats["train"]["documents"] == stats["validation"]["documents"] == count
    assert stats["train"]["kept_fraction"] >= 0.95 and stats["example_format"] == "electra"
    assert list((tmp_path / "cache").glob(f"blocks-*/{pretrain_data.DATA_STATS_FILE}"))
