"""ELECTRA's pretraining examples (build_pretraining_dataset.py's ExampleBuilder), token types and padding."""

import math
import random

import pytest
import torch

import pretrain_data
import rtd
import wikitext_trainer as wt
from pretrain_utils import trainer_argv
from test_masking import padded_batch, tiny_pair

SPECIAL = {"cls": 2, "sep": 3, "pad": 0}
# Two documents with disjoint words; each line is one "sentence" of the document.
DOCUMENTS = [
    ["cat sat on mat", "dog ran fast", "a small red book", "john wrote his book"] * 6,
    ["river and city .", "the king saw the church", "music of the world ."] * 8,
]


def document_tokens(tokenizer, document: list[str]) -> set[int]:
    return {t for line in document for t in tokenizer(line, add_special_tokens=False)["input_ids"]}


def segments(row: list[int], types: list[int], tokenizer) -> tuple[list[int], list[int]]:
    """Check the `[CLS] A [SEP] B [SEP] [PAD]...` layout and its type ids; return (A, B)."""
    real = [t for t in row if t != tokenizer.pad_token_id]
    assert row[len(real) :] == [tokenizer.pad_token_id] * (len(row) - len(real)), "padding only at the end"
    assert real[0] == tokenizer.cls_token_id and real[-1] == tokenizer.sep_token_id
    first_sep = real.index(tokenizer.sep_token_id)
    assert types[: first_sep + 1] == [0] * (first_sep + 1), "[CLS] A [SEP] has type 0"
    assert types[first_sep + 1 : len(real)] == [1] * (len(real) - first_sep - 1), "B [SEP] has type 1"
    assert types[len(real) :] == [0] * (len(row) - len(real)), "padding has type 0"
    return real[1:first_sep], real[first_sep + 1 : -1]


@pytest.mark.parametrize("max_length", [16, 32])
def test_examples_never_cross_a_document_and_carry_segment_types(tokenizer, max_length):
    articles = ["\n".join(document) for document in DOCUMENTS]
    examples = pretrain_data.tokenize_into_examples({"text": articles}, [0, 1], tokenizer, max_length)
    vocabularies = [document_tokens(tokenizer, document) for document in DOCUMENTS]
    assert not vocabularies[0] & vocabularies[1], "the fixture documents must not share tokens"
    two_segments = 0
    for row, types in zip(examples["input_ids"], examples["token_type_ids"], strict=True):
        assert len(row) == len(types) == max_length
        first, second = segments(row, types, tokenizer)
        words = set(first + second)
        assert any(words <= vocabulary for vocabulary in vocabularies), "an example crosses documents"
        two_segments += bool(second)
    assert two_segments > len(examples["input_ids"]) / 2


def test_segment_split_follows_electras_rules():
    rng = random.Random(0)
    sentences = [[10 + i] * 4 for i in range(20)]  # 80 tokens in sentences of 4
    seen_single = seen_pair = False
    for _ in range(200):
        first, second = pretrain_data.split_segments(sentences, 64, 64, rng)
        assert len(first) + len(second) + 3 <= 64 or not second
        assert len(first) <= 62
        if not second:
            seen_single = True  # p 0.1: everything to A, truncated to max_length - 2
            assert first == sum(sentences, [])[:62]
        else:
            seen_pair = True  # A targets (64 - 3) // 2 = 30 tokens: 28 fit, the 8th sentence joins with p 0.5
            assert len(first) in (28, 32)
            assert len(second) == 64 - len(first) - 3, "B is truncated to fill the example exactly"
    assert seen_single and seen_pair


def test_single_segment_and_short_example_rates(tokenizer):
    """Over many examples: one segment with p 0.1, a target length randint(5, L) with p 0.05."""
    max_length, examples, rng = 64, [], random.Random(1)
    one_token_sentences = [[7]] * 3000  # every example then holds exactly its target length - 3 tokens
    while len(examples) < 12_000:
        ids, types, _ = pretrain_data.document_examples(one_token_sentences, max_length, rng, SPECIAL)
        examples += list(zip(ids[:-1], types[:-1], strict=True))  # a document's last example is a remainder
    n = len(examples)
    pairs = [ids for ids, types in examples if 1 in types]
    single = 1 - len(pairs) / n
    assert abs(single - pretrain_data.SINGLE_SEGMENT_PROB) < 4 * math.sqrt(0.1 * 0.9 / n), single
    # A two-segment example of target T holds T - 3 tokens and 3 specials: it is short (padded) iff
    # T <= L - 1, so the expected share is 0.05 x that share of randint(5, L).
    expected = pretrain_data.SHORT_EXAMPLE_PROB * (max_length - 5) / (max_length - 5 + 1)
    short = sum(1 for ids in pairs if ids[-1] == SPECIAL["pad"]) / len(pairs)
    sigma = math.sqrt(expected * (1 - expected) / len(pairs))
    assert abs(short - expected) < 4 * sigma, (short, expected)


def test_every_token_of_a_document_lands_in_its_examples():
    """ELECTRA's builder drops the part of the last sentence past the example's end; here it starts the next
    example, so the examples hold every token once, and a sentence longer than an example is spread."""
    rng = random.Random(3)
    for trial in range(50):
        lengths = [rng.randint(1, 90) for _ in range(rng.randint(1, 12))]
        next_id = iter(range(10, 100_000))
        sentences = [[next(next_id) for _ in range(length)] for length in lengths]
        ids, types, kept = pretrain_data.document_examples(sentences, 32, random.Random(trial), SPECIAL)
        text = [t for row in ids for t in row if t not in SPECIAL.values()]
        assert sorted(text) == sorted(t for s in sentences for t in s), "every token exactly once"
        assert sum(kept) == len(text) == sum(lengths)
        assert all(len(row) == 32 for row in ids)


def test_padding_takes_no_part_in_masking_losses_routing_or_metrics(tokenizer):
    """Whatever the padded positions hold, every loss and statistic is the same (MoE model, explicit mask)."""
    generator, discriminator = tiny_pair(tokenizer, num_experts=4)
    model = rtd.ElectraPretrainingModel(generator, discriminator, tokenizer).eval()
    ids, attention = padded_batch(tokenizer)
    ids, attention = ids[:8, :64], attention[:8, :64]
    attention[:, 40:] = 0
    ids[:, 39] = tokenizer.sep_token_id
    garbage = ids.clone()
    garbage[attention == 0] = torch.randint(10, len(tokenizer), ((attention == 0).sum().item(),))
    ids[attention == 0] = tokenizer.pad_token_id
    outputs = []
    for batch in (ids, garbage):
        torch.manual_seed(0)
        outputs.append(model(batch, attention))
    for name, value in outputs[0].items():
        torch.testing.assert_close(value, outputs[1][name], msg=name)
    assert outputs[0]["stats/tokens"] == attention.sum(), "metrics and tokens/s count only real tokens"


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)], ids=["generator", "discriminator"])
def test_token_types_reach_the_generator_and_the_discriminator(tokenizer, weights):
    generator, discriminator = tiny_pair(tokenizer)
    model = rtd.ElectraPretrainingModel(generator, discriminator, tokenizer, gen_weight=weights[0],
                                        disc_weight=weights[1])  # fmt: skip
    ids, attention = padded_batch(tokenizer)
    types = torch.zeros_like(ids)
    types[:, 20:] = 1
    model(ids[:8, :64], attention[:8, :64], types[:8, :64])["loss"].backward()
    row = model.discriminator.electra.embeddings.token_type_embeddings.weight.grad[1]
    assert row.abs().sum() > 0


def test_segment_1_embedding_gets_a_gradient_in_a_short_run(tmp_path, vocab_dir, monkeypatch):
    """ELECTRA's examples train the type-1 embedding row; the packed blocks never did."""
    gradients = {}

    def build_models_watching_types(*args):
        generator, discriminator = build_models(*args)
        weight = discriminator.electra.embeddings.token_type_embeddings.weight
        weight.register_hook(lambda grad: gradients.setdefault(fmt, []).append(grad[1].abs().sum().item()))
        return generator, discriminator

    build_models = wt.build_models
    monkeypatch.setattr(wt, "build_models", build_models_watching_types)
    for fmt in ("electra", "packed"):
        argv = trainer_argv(tmp_path, vocab_dir, "--example_format", fmt, "--max_training_steps", "2",
                            name=fmt, cache=tmp_path / "cache")  # fmt: skip
        assert wt.main(argv) == 0
    assert len(gradients["electra"]) == len(gradients["packed"]) == 2
    assert all(g > 0 for g in gradients["electra"])
    assert all(g == 0 for g in gradients["packed"])
