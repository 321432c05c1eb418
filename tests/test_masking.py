"""ELECTRA's masking, sampling and replaced-token labels, and the generator + discriminator module."""

import torch
from transformers import AutoTokenizer

import rtd
from conftest import write_vocab_dir
from modeling_electra import (
    ElectraMoEConfig,
    ElectraMoEForMaskedLM,
    ElectraMoEForPreTraining,
    make_generator_config,
)

BATCH, SEQ = 64, 256


def padded_batch(tokenizer, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words ... [SEP] [PAD]...: random non-special ids, each row padded after a random length."""
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    ids = words[torch.randint(len(words), (BATCH, SEQ), generator=gen)]
    lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=gen)
    attention = (torch.arange(SEQ) < lengths[:, None]).long()
    ids[:, 0] = tokenizer.cls_token_id
    ids[torch.arange(BATCH), lengths - 1] = tokenizer.sep_token_id
    ids[attention == 0] = tokenizer.pad_token_id
    return ids, attention


def unmaskable_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id])


def expected_counts(attention: torch.Tensor, mask_prob: float = rtd.MASK_PROB) -> torch.Tensor:
    """ELECTRA's pretrain_helpers.mask: max(1, min(max_predictions_per_seq, round(mask_prob * real tokens)))."""
    cap = int((mask_prob + 0.005) * attention.shape[1])
    return (attention.sum(1).float() * mask_prob).round().clamp(1, cap).long()


def test_masking_count_special_tokens_and_85_15_split(tokenizer):
    ids, attention = padded_batch(tokenizer)
    maskable = rtd.maskable_positions(ids, attention, unmaskable_ids(tokenizer))
    masked_ids, is_masked = rtd.mask_tokens(
        ids, maskable, attention, tokenizer.mask_token_id, generator=torch.Generator().manual_seed(1)
    )

    assert not is_masked[attention == 0].any(), "padding was masked"
    for token in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        assert not is_masked[ids == token].any(), f"special token {token} was masked"
    assert torch.equal(masked_ids[~is_masked], ids[~is_masked]), "unmasked tokens changed"

    # A fixed count per sequence (not a Bernoulli draw per token): fails on independent p = 0.15 masking.
    assert torch.equal(is_masked.sum(1), expected_counts(attention))
    became_mask = masked_ids[is_masked] == tokenizer.mask_token_id
    assert abs(became_mask.float().mean().item() - rtd.MASK_TOKEN_FRACTION) < 0.03
    kept = ~became_mask
    assert torch.equal(masked_ids[is_masked][kept], ids[is_masked][kept]), "the other 15% must stay unchanged"
    assert (masked_ids == tokenizer.mask_token_id).sum() == became_mask.sum(), (
        "[MASK] outside masked positions"
    )


def test_masking_count_caps_at_max_predictions_per_seq_and_picks_uniformly(tokenizer):
    assert rtd.max_predictions_per_seq(128) == 19  # ELECTRA-Small: int((0.15 + 0.005) * 128)
    assert rtd.max_predictions_per_seq(512) == 79
    ids, attention = padded_batch(tokenizer, seed=3)
    maskable = rtd.maskable_positions(ids, attention, unmaskable_ids(tokenizer))
    _, is_masked = rtd.mask_tokens(ids, maskable, attention, tokenizer.mask_token_id, mask_prob=0.4)
    assert torch.equal(is_masked.sum(1), expected_counts(attention, 0.4))
    # The cap binds where rounding goes up: 10 real tokens of 10 -> round(1.5) = 2, capped at int(1.55) = 1.
    full = torch.ones_like(attention[:, :10])
    _, capped = rtd.mask_tokens(ids[:, :10], maskable[:, :10], full, tokenizer.mask_token_id)
    assert (capped.sum(1) == 1).all()
    # Short rows: at least one position; never more than the maskable ones.
    short = torch.zeros_like(attention)
    short[:, :3] = 1
    _, few = rtd.mask_tokens(ids, short.bool() & maskable, short, tokenizer.mask_token_id)
    assert torch.equal(few.sum(1), (short.bool() & maskable).sum(1).clamp(max=1))
    # Every maskable position is equally likely: over many draws each column is picked about as often.
    row = ids[:1].expand(4000, -1)
    row_attention, row_maskable = attention[:1].expand(4000, -1), maskable[:1].expand(4000, -1)
    _, picks = rtd.mask_tokens(
        row, row_maskable, row_attention, 4, generator=torch.Generator().manual_seed(5)
    )
    frequency = picks.float().mean(0)[row_maskable[0]]
    expected = expected_counts(attention[:1]).item() / row_maskable[0].sum().item()
    assert torch.allclose(frequency, torch.full_like(frequency, expected), atol=0.03), frequency


def test_unk_may_be_masked_but_not_cls_sep_mask_or_padding(tokenizer):
    """ELECTRA's get_candidates_mask excludes only [CLS], [SEP], [MASK] and padding; [UNK] is a token."""
    model = rtd.ElectraPretrainingModel(*tiny_pair(tokenizer), tokenizer)
    ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.unk_token_id, 40, tokenizer.mask_token_id,
                         tokenizer.sep_token_id, tokenizer.pad_token_id]])  # fmt: skip
    attention = (ids != tokenizer.pad_token_id).long()
    maskable = rtd.maskable_positions(ids, attention, model.unmaskable_ids)
    assert maskable.tolist() == [[False, True, True, False, False, False]]


def test_sampling_follows_the_generator_distribution_in_fp32():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-12).log().to(torch.bfloat16).expand(40_000, -1)
    sampled = rtd.sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    assert sampled.dtype == torch.long and sampled.shape == (40_000,)
    frequencies = torch.bincount(sampled, minlength=4).float() / len(sampled)
    assert torch.allclose(frequencies, probs, atol=0.01), frequencies
    assert rtd.sample_tokens(torch.tensor([[0.0, 30.0, 0.0]], requires_grad=True)).item() == 1


def test_a_sample_equal_to_the_original_counts_as_original():
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    is_masked = torch.tensor([[False, True, True, False, True, False]])
    sampled = torch.tensor([10, 40, 13])  # same, different, same
    replaced, labels = rtd.replace_tokens(ids, is_masked, sampled)
    assert replaced.tolist() == [[2, 10, 40, 12, 13, 3]]
    assert labels.tolist() == [[0, 0, 1, 0, 0, 0]]


def tiny_pair(tokenizer, num_experts: int = 1):
    config = ElectraMoEConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, embedding_size=32, num_experts=num_experts, top_k=min(2, num_experts),
    )  # fmt: skip
    return ElectraMoEForMaskedLM(make_generator_config(config)), ElectraMoEForPreTraining(config)


def test_generator_and_discriminator_share_one_embedding_module(tokenizer):
    generator, discriminator = tiny_pair(tokenizer)
    model = rtd.ElectraPretrainingModel(generator, discriminator, tokenizer)
    disc_embeddings = model.discriminator.electra.embeddings
    assert model.generator.electra.embeddings is disc_embeddings
    assert model.generator.generator_lm_head.weight is disc_embeddings.word_embeddings.weight
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.startswith("generator.electra.embeddings.") for name in names), (
        "embeddings duplicated"
    )


def test_loss_combines_weighted_mlm_rtd_and_router_losses(tokenizer):
    torch.manual_seed(0)
    generator, discriminator = tiny_pair(tokenizer, num_experts=4)
    model = rtd.ElectraPretrainingModel(generator, discriminator, tokenizer, gen_weight=2.0, disc_weight=7.0)
    ids, attention = padded_batch(tokenizer)
    out = model(ids[:8, :64], attention[:8, :64])
    # Each model's router loss is weighted like its own task loss (Switch's relative weighting).
    gen_total = out["stats/gen_loss"] + out["stats/gen_router_loss"]
    expected = 2.0 * gen_total + 7.0 * (out["stats/disc_loss"] + out["stats/disc_router_loss"])
    assert out["stats/disc_router_loss"] > 0 and out["stats/gen_router_loss"] == 0, "generator is dense here"
    assert torch.allclose(out["loss"].detach(), expected)
    assert out["stats/expert_load"].shape == (2, 4)
    assert out["stats/tokens"] == attention[:8, :64].sum(), "RTD must cover exactly the non-padding tokens"


def test_no_gradient_reaches_the_generator_through_sampling(tokenizer):
    torch.manual_seed(0)
    generator, discriminator = tiny_pair(tokenizer)
    model = rtd.ElectraPretrainingModel(generator, discriminator, tokenizer, gen_weight=0.0)
    ids, attention = padded_batch(tokenizer)
    model(ids[:8, :64], attention[:8, :64])["loss"].backward()
    generator_only = [
        (n, p) for n, p in model.generator.named_parameters() if not n.startswith("electra.embeddings")
    ]
    generator_only = [(n, p) for n, p in generator_only if n != "generator_lm_head.weight"]
    assert generator_only
    for name, param in generator_only:
        assert param.grad is None or not param.grad.any(), f"{name} got a gradient from the RTD loss"
    assert model.discriminator.discriminator_predictions.dense.weight.grad.abs().sum() > 0


def test_mask_id_comes_from_the_tokenizer(tmp_path):
    """A vocabulary whose [MASK] is not BERT's id 103 (nor 4): the generator must see that id."""
    vocab = write_vocab_dir(tmp_path / "vocab")
    lines = (vocab / "vocab.txt").read_text().split()
    lines.remove("[MASK]")
    lines.insert(30, "[MASK]")
    (vocab / "vocab.txt").write_text("\n".join(lines) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(vocab))
    assert tokenizer.mask_token_id == 30

    torch.manual_seed(0)
    generator, discriminator = tiny_pair(tokenizer)
    model = rtd.ElectraPretrainingModel(generator, discriminator, tokenizer)
    seen = {}
    generator.electra.register_forward_pre_hook(lambda module, args: seen.setdefault("ids", args[0]))
    ids, attention = padded_batch(tokenizer)
    model(ids[:8], attention[:8])
    changed = seen["ids"] != ids[:8]
    assert changed.any()
    assert (seen["ids"][changed] == 30).all()
