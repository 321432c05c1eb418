"""Keyed randomness (rtd.example_keys): masks and replacement samples that are a function of (seed, step,
example index, position) only, so an example draws the same whatever batch, batch position or process it is
in; the draws still follow ELECTRA's masking rules and the generator's distribution."""

import torch

import rtd
from test_masking import expected_counts, padded_batch, tiny_pair, unmaskable_ids

MASK32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """murmur3's finaliser in plain Python integers: what rtd.mix32 must compute."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def test_mix32_is_murmur3_fmix32_and_keyed_uniforms_are_uniform():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, MASK32, *range(1000, 100_000, 997)]
    assert rtd.mix32(torch.tensor(values)).tolist() == [fmix32(v) for v in values]
    keys = rtd.example_keys(seed=7, step=3, example_indices=range(50))
    assert (
        keys.dtype == torch.long and len(set(keys.tolist())) == 50 and ((keys >= 0) & (keys <= MASK32)).all()
    )
    uniform = rtd.keyed_uniform(rtd.position_keys(keys, rtd.STREAM_MASK_SCORES, 4000)).flatten()
    assert ((uniform >= 0) & (uniform < 1)).all()
    counts = torch.histc(uniform, bins=20, min=0, max=1)
    expected = uniform.numel() / 20
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 45, chi_square  # 19 degrees of freedom: P(chi2 > 45) < 0.001
    # Neighbouring keys, positions and streams are uncorrelated.
    a, b = uniform.view(50, 4000)[:, :-1], uniform.view(50, 4000)[:, 1:]
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01
    other = rtd.keyed_uniform(rtd.position_keys(keys, rtd.STREAM_MASK_TOKEN, 4000)).flatten()
    assert abs(torch.corrcoef(torch.stack([uniform, other]))[0, 1].item()) < 0.01


def test_keyed_masks_follow_electra_and_do_not_depend_on_batch_companions(tokenizer):
    ids, attention = padded_batch(tokenizer)
    maskable = rtd.maskable_positions(ids, attention, unmaskable_ids(tokenizer))
    keys = rtd.example_keys(42, 5, torch.arange(100, 100 + len(ids)))
    masked_ids, is_masked = rtd.mask_tokens(ids, maskable, attention, tokenizer.mask_token_id, keys=keys)
    assert torch.equal(is_masked.sum(1), expected_counts(attention)) and not (is_masked & ~maskable).any()
    became_mask = masked_ids[is_masked] == tokenizer.mask_token_id
    assert abs(became_mask.float().mean().item() - rtd.MASK_TOKEN_FRACTION) < 0.03
    # Alone, or in the batch reversed: each example is masked exactly as in the batch.
    for row in (0, 17, 63):
        one = slice(row, row + 1)
        alone = rtd.mask_tokens(
            ids[one], maskable[one], attention[one], tokenizer.mask_token_id, keys=keys[one]
        )
        assert torch.equal(alone[0], masked_ids[one]) and torch.equal(alone[1], is_masked[one])
    flipped = rtd.mask_tokens(
        ids.flip(0), maskable.flip(0), attention.flip(0), tokenizer.mask_token_id, keys=keys.flip(0)
    )
    assert torch.equal(flipped[1].flip(0), is_masked)
    # Another step draws other masks; every maskable position is equally likely over many keys.
    other_step = rtd.mask_tokens(
        ids,
        maskable,
        attention,
        tokenizer.mask_token_id,
        keys=rtd.example_keys(42, 6, torch.arange(100, 164)),
    )[1]
    assert not torch.equal(other_step, is_masked)
    many = rtd.example_keys(1, 0, range(4000))
    row, row_attention, row_maskable = (t[:1].expand(4000, -1) for t in (ids, attention, maskable))
    _, picks = rtd.mask_tokens(row, row_maskable, row_attention, 4, keys=many)
    frequency = picks.float().mean(0)[row_maskable[0]]
    expected = expected_counts(attention[:1]).item() / row_maskable[0].sum().item()
    assert torch.allclose(frequency, torch.full_like(frequency, expected), atol=0.03), frequency


def test_keyed_sampling_follows_the_generator_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-12).log().expand(40_000, -1)
    sampled = rtd.sample_tokens(logits, keys=rtd.example_keys(3, 0, range(40_000)))
    frequencies = torch.bincount(sampled, minlength=4).float() / len(sampled)
    assert torch.allclose(frequencies, probs, atol=0.01), frequencies


def test_keyed_forward_sums_over_split_batches_to_the_whole_batch(tokenizer):
    """The objective's summable statistics of a batch equal those of its halves: what makes N processes
    draw what one process draws (eval mode: no dropout; dense, so no batch-wide load-balancing loss)."""
    torch.manual_seed(0)
    model = rtd.ElectraPretrainingModel(*tiny_pair(tokenizer), tokenizer).eval()
    ids, attention = padded_batch(tokenizer, seed=4)
    ids, attention = ids[:8, :64], attention[:8, :64].clone()
    attention[:, -1] = 1  # every row real up to the end: equal token counts per half
    ids[:, -1] = tokenizer.sep_token_id
    keys = rtd.example_keys(42, 9, torch.arange(8) * 13)
    with torch.no_grad():
        whole = model(ids, attention, example_keys=keys)
        halves = [model(ids[h], attention[h], example_keys=keys[h]) for h in (slice(0, 4), slice(4, 8))]
        again = model(ids, attention, example_keys=keys)
    for name in ("stats/masked", "stats/replaced", "stats/gen_correct", "stats/true_positives"):
        assert whole[name].item() == sum(half[name].item() for half in halves), name
    assert whole["stats/replaced"] > 0
    gen_sum = sum(half["stats/gen_loss"] * half["stats/masked"] for half in halves)
    torch.testing.assert_close(whole["stats/gen_loss"] * whole["stats/masked"], gen_sum)
    disc_sum = sum(half["stats/disc_loss"] * half["stats/tokens"] for half in halves)
    torch.testing.assert_close(whole["stats/disc_loss"] * whole["stats/tokens"], disc_sum)
    assert torch.equal(whole["loss"], again["loss"])  # deterministic: no global generator involved


class TwoProcesses:
    """Stands in for accelerate on one of two processes: `reduce` sums over both halves' counts."""

    num_processes = 2

    def __init__(self, global_counts: torch.Tensor):
        self.global_counts = global_counts

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum" and tensor.shape == self.global_counts.shape
        return self.global_counts


def test_data_parallel_loss_averages_to_the_whole_batch_gradient_when_halves_differ_in_length(tokenizer):
    """Halves with different numbers of real tokens and masked positions: the average of the two processes'
    `data_parallel_loss` gradients (what DDP applies) is the whole batch's gradient, MLM, RTD and router
    z-loss included. Averaging the per-half mean losses instead is off (the test checks it would fail)."""
    torch.manual_seed(0)
    generator, discriminator = tiny_pair(tokenizer, num_experts=4)
    discriminator.config.router_aux_loss_coef = 0.0  # Switch's loss is a per-process product of means
    model = rtd.ElectraPretrainingModel(generator, discriminator, tokenizer).eval()
    ids, attention = padded_batch(tokenizer, seed=4)
    ids, attention = ids[:8], attention[:8]
    keys = rtd.example_keys(42, 9, torch.arange(8) * 13)
    halves = (slice(0, 4), slice(4, 8))

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = model(ids, attention, example_keys=keys)
    assert whole["stats/z_loss"] > 0
    outputs = [model(ids[h], attention[h], example_keys=keys[h]) for h in halves]
    counts = [torch.stack([out["stats/masked"], out["stats/tokens"]]) for out in outputs]
    assert not torch.equal(counts[0], counts[1]), "the halves must differ in length for this test"
    accelerator = TwoProcesses(counts[0] + counts[1])
    expected = gradient(whole["loss"])
    averaged = sum(gradient(rtd.data_parallel_loss(out, accelerator)) for out in outputs) / 2
    torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-6)
    outputs = [model(ids[h], attention[h], example_keys=keys[h]) for h in halves]
    naive = sum(gradient(out["loss"]) for out in outputs) / 2
    assert not torch.allclose(naive, expected, rtol=1e-4, atol=1e-6)


def test_keyed_rng_benchmark_runs(capsys):
    from bench import bench_keyed_rng

    assert (
        bench_keyed_rng.main(["--batch_size", "4", "--seq_len", "16", "--vocab_size", "50", "--rounds", "3"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "keyed / global: best" in printed and "masking alone: keyed" in printed
