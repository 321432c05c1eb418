"""ELECTRA's replaced-token-detection objective (Clark et al. 2020): mask, generate, replace, detect.

`ElectraPretrainingModel.forward` is the whole objective in one place: mask 15% of the real tokens (a
fixed count per sequence, as ELECTRA's `pretrain_helpers.mask`), let the small generator (a masked LM)
predict them, sample replacements from its output, and train the discriminator to tell every original
token from a replaced one. `MetricWindow` turns the statistics the
forward returns into the logged metrics.

Keyed randomness: given `example_keys` (from `example_keys(seed, step, example indices)`), every random
number of the masking and the sampling is a hash of (seed, step, example, stream, position), so an example's
masks and replacements do not depend on which process, batch or batch position it lands in: N processes
draw exactly what one process draws. Constants follow google-research/electra
(`configure_pretraining.py`, `pretrain_helpers.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeling_electra import ROUTER_STATISTICS

MASK_PROB = 0.15
# pretrain_helpers.mask(): 85% of the selected positions become [MASK], the other 15% stay unchanged.
MASK_TOKEN_FRACTION = 0.85
GEN_WEIGHT = 1.0
DISC_WEIGHT = 50.0


# ----------------------------------------------------------------------------------------------------------
# Keyed randomness: counter-based uniforms from a 32-bit hash (murmur3's finaliser), vectorised in int64
# ----------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_KEY_START = 0x9E3779B9  # not 0, which mix32 maps to itself
# Streams: which random quantity a number is for (hashed in, so the streams are independent).
STREAM_MASK_SCORES, STREAM_MASK_TOKEN, STREAM_SAMPLE = 1, 2, 3
SPLITS = {"train": 0, "validation": 1}


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h * constant) mod 2^32 for h in [0, 2^32), in two 16-bit halves so no int64 product overflows."""
    high, low = constant >> 16, constant & 0xFFFF
    return ((((h * high) & 0xFFFF) << 16) + h * low) & _MASK32


def mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 on an int64 tensor of values in [0, 2^32): a bijection with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def example_keys(
    seed: int, step: int, example_indices: Any, split: str = "train", device: torch.device | str | None = None
) -> torch.Tensor:
    """[batch] int64 keys in [0, 2^32), one per example: a hash of (seed, split, step, example index).

    `example_indices` are the examples' indices in the whole dataset (not in the batch), so a key, and
    with it every random number `ElectraPretrainingModel` draws for the example, is the same whatever
    process or micro-batch the example is in. Pass the result as the forward's `example_keys`.
    """
    index = torch.as_tensor(example_indices, dtype=torch.long, device=device)
    h = torch.full_like(index, _KEY_START)
    for word in (
        seed & _MASK32,
        (seed >> 32) & _MASK32,
        SPLITS[split],
        step & _MASK32,
        (step >> 32) & _MASK32,
    ):
        h = mix32(h ^ word)
    h = mix32(h ^ (index & _MASK32))
    return mix32(h ^ ((index >> 32) & _MASK32))


def position_keys(keys: torch.Tensor, stream: int, length: int) -> torch.Tensor:
    """[rows, length] hashed keys for the positions 0..length-1 of each row's `stream`."""
    base = mix32(mix32(keys ^ stream))
    return mix32(base.unsqueeze(-1) ^ torch.arange(length, device=keys.device))


def keyed_uniform(keys: torch.Tensor) -> torch.Tensor:
    """One fp32 uniform in [0, 1) per hashed key (its top 24 bits, as many as `torch.rand` has for fp32)."""
    return (keys >> 8).float() * 2.0**-24


def keyed_uniform_fp64(keys: torch.Tensor) -> torch.Tensor:
    """One fp64 uniform in [0, 1) per key, with 53 random bits from two further hashes of it."""
    high = mix32(keys ^ 0x68E31DA4) >> 6  # 26 bits
    low = mix32(keys ^ 0xB5297A4D) >> 5  # 27 bits
    return (high * 2**27 + low).double() * 2.0**-53


# ----------------------------------------------------------------------------------------------------------
# Masking, sampling, replacing
# ----------------------------------------------------------------------------------------------------------


def max_predictions_per_seq(seq_length: int, mask_prob: float = MASK_PROB) -> int:
    """ELECTRA's cap on masked positions per sequence (configure_pretraining.py): 19 at length 128."""
    return int((mask_prob + 0.005) * seq_length)


def maskable_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, unmaskable_ids: torch.Tensor
) -> torch.Tensor:
    """Positions the masking may pick: real tokens other than [CLS], [SEP] and [MASK] ([UNK] may be masked,
    as in ELECTRA's `get_candidates_mask`; padding never)."""
    return attention_mask.bool() & ~torch.isin(input_ids, unmaskable_ids)


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    mask_prob: float = MASK_PROB,
    mask_token_fraction: float = MASK_TOKEN_FRACTION,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELECTRA's `pretrain_helpers.mask`: in each sequence, mask `max(1, min(max_predictions_per_seq,
    round(mask_prob * real tokens)))` maskable positions drawn uniformly; 85% become `[MASK]`, the rest stay.

    Returns `(masked_input_ids, is_masked)`. The positions are distinct (ELECTRA draws them with
    replacement, so a repeated draw occasionally masks one fewer); a sequence with fewer maskable tokens
    than the count has all of them masked. With `keys` ([batch], from `example_keys`) the draws are keyed
    per example and position instead of coming from `generator` (or torch's global generator).
    """
    real_tokens = attention_mask.sum(dim=-1).float()
    limit = max_predictions_per_seq(input_ids.shape[-1], mask_prob)
    count = torch.round(real_tokens * mask_prob).clamp(min=1, max=max(1, limit)).long()
    # Random scores, unmaskable positions last: a position is picked when its rank is below the count.
    scores = draw_uniform(input_ids.shape, input_ids.device, generator, keys, STREAM_MASK_SCORES)
    ranks = scores.masked_fill(~maskable, 2.0).argsort(dim=-1).argsort(dim=-1)
    is_masked = (ranks < count.unsqueeze(-1)) & maskable
    keep_draws = draw_uniform(input_ids.shape, input_ids.device, generator, keys, STREAM_MASK_TOKEN)
    use_mask_token = is_masked & (keep_draws < mask_token_fraction)
    return input_ids.masked_fill(use_mask_token, mask_token_id), is_masked


def draw_uniform(
    shape: torch.Size,
    device: torch.device,
    generator: torch.Generator | None,
    keys: torch.Tensor | None,
    stream: int,
) -> torch.Tensor:
    """[rows, length] uniforms in [0, 1): keyed per row and position when `keys` ([rows]) is given."""
    if keys is None:
        return torch.rand(shape, device=device, generator=generator)
    return keyed_uniform(position_keys(keys.to(device), stream, shape[-1]))


def sample_tokens(
    logits: torch.Tensor, generator: torch.Generator | None = None, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Sample one token per row at temperature 1 by inverting its distribution function with one uniform
    per row (softmax in fp32, cumulative sum in fp64; no gradient).

    `keys` ([rows]): one key per row (a masked position, see `masked_position_keys`), the uniform keyed by
    it; otherwise drawn from `generator`. One number per row, not one per vocabulary entry as the
    Gumbel-max trick needs, keeps the keyed draw cheap.
    """
    cdf = logits.detach().float().softmax(dim=-1).double().cumsum(dim=-1)
    if keys is None:
        uniform = torch.rand(cdf.shape[0], dtype=torch.float64, device=cdf.device, generator=generator)
    else:
        uniform = keyed_uniform_fp64(keys.to(cdf.device))
    target = (uniform * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def masked_position_keys(keys: torch.Tensor, is_masked: torch.Tensor) -> torch.Tensor:
    """One key per masked position, in `tensor[is_masked]` order: the sampling's per-row keys."""
    return position_keys(keys.to(is_masked.device), STREAM_SAMPLE, is_masked.shape[-1])[is_masked]


def replace_tokens(
    input_ids: torch.Tensor, is_masked: torch.Tensor, sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the sampled tokens at the masked positions; a token is "replaced" only if it differs.

    Returns `(discriminator_input_ids, replaced_labels)`: a sample equal to the original counts as original.
    """
    replaced_ids = input_ids.masked_scatter(is_masked, sampled.to(input_ids.dtype))
    return replaced_ids, (replaced_ids != input_ids).long()


def tie_generator_to_discriminator(generator: nn.Module, discriminator: nn.Module) -> None:
    """Share token, position and type embeddings (one module), as in ELECTRA; the LM head stays tied."""
    generator.electra.embeddings = discriminator.electra.embeddings
    generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight


class ElectraPretrainingModel(nn.Module):
    """Generator and discriminator in one module, so accelerate/DDP sees a single forward and backward.

    `forward(input_ids)` returns the combined loss `gen_weight * (MLM + generator router loss) +
    disc_weight * (RTD + discriminator router loss)` and detached statistics for logging (`stats/*`: sums
    and counts, so they can be summed over batches and processes).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        tokenizer: Any,
        mask_prob: float = MASK_PROB,
        gen_weight: float = GEN_WEIGHT,
        disc_weight: float = DISC_WEIGHT,
    ):
        super().__init__()
        tie_generator_to_discriminator(generator, discriminator)
        # Registered first, so the shared embeddings are named (and checkpointed) as the discriminator's.
        self.discriminator = discriminator
        self.generator = generator
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.mask_prob = mask_prob
        self.gen_weight = gen_weight
        self.disc_weight = disc_weight
        unmaskable = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id}
        self.register_buffer(
            "unmaskable_ids", torch.tensor(sorted(unmaskable), dtype=torch.long), persistent=False
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        example_keys: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`example_keys` ([batch], from `rtd.example_keys`): draw masks and samples keyed per example (the
        same on any number of processes); without them, from torch's global generator."""
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        active = attention_mask.bool()  # padding takes no part in masking, losses, routing or metrics

        # 1. Mask: a fixed count per sequence among the real tokens other than [CLS]/[SEP]/[MASK].
        maskable = maskable_positions(input_ids, attention_mask, self.unmaskable_ids)
        masked_ids, is_masked = mask_tokens(
            input_ids, maskable, attention_mask, self.mask_token_id, self.mask_prob, keys=example_keys
        )

        # 2. Generator: MLM logits only at the masked positions (ELECTRA gathers them the same way).
        gen_out = self.generator.electra(masked_ids, attention_mask, token_type_ids)
        gen_hidden = self.generator.generator_predictions(gen_out.last_hidden_state[is_masked])
        gen_logits = self.generator.generator_lm_head(gen_hidden).float()
        targets = input_ids[is_masked]
        gen_loss_sum = F.cross_entropy(gen_logits, targets, reduction="sum")
        gen_loss = gen_loss_sum / max(targets.numel(), 1)

        # 3. Replace: sample from the generator (no gradient flows back through the sample).
        with torch.no_grad():
            row_keys = None if example_keys is None else masked_position_keys(example_keys, is_masked)
            sampled = sample_tokens(gen_logits, keys=row_keys)
        disc_input, labels = replace_tokens(input_ids, is_masked, sampled)

        # 4. Discriminator: original vs replaced on every real token.
        disc_out = self.discriminator(disc_input, attention_mask, token_type_ids)
        disc_logits = disc_out.logits[active].float()
        disc_labels = labels[active].float()
        disc_loss_sum = F.binary_cross_entropy_with_logits(disc_logits, disc_labels, reduction="sum")
        disc_loss = disc_loss_sum / max(disc_labels.numel(), 1)

        # 5. Combine. Each model's router loss is weighted like its own task loss, so router_aux_loss_coef
        # keeps the meaning it has in Switch Transformer (relative to the task loss) despite RTD's weight 50.
        router_loss = self.gen_weight * gen_out.router_loss + self.disc_weight * disc_out.router_loss
        loss = self.gen_weight * gen_loss + self.disc_weight * disc_loss + router_loss
        # The same loss as sums over masked positions and over real tokens (z-loss: a mean over real tokens)
        # plus a per-process remainder, so `data_parallel_loss` can normalise over the whole global batch.
        z_loss = self.gen_weight * self._z_coef(self.generator) * gen_out.z_loss
        z_loss = z_loss + self.disc_weight * self._z_coef(self.discriminator) * disc_out.z_loss
        loss_terms = {
            "loss_terms/masked_sum": self.gen_weight * gen_loss_sum,
            "loss_terms/token_sum": self.disc_weight * disc_loss_sum + z_loss * disc_labels.numel(),
            "loss_terms/per_process": router_loss - z_loss,
        }
        stats = rtd_statistics(
            loss,
            gen_loss,
            disc_loss,
            router_loss,
            gen_out,
            disc_out,
            gen_logits,
            targets,
            disc_logits,
            disc_labels,
        )
        stats |= {"gen_loss_sum": gen_loss_sum.detach(), "disc_loss_sum": disc_loss_sum.detach()}
        stats |= {name[len("loss_terms/") :]: value.detach() for name, value in loss_terms.items()}
        stats["router_z_loss_sum"] = z_loss.detach() * disc_labels.numel()
        return {"loss": loss, **loss_terms, **{f"stats/{name}": value for name, value in stats.items()}}

    @staticmethod
    def _z_coef(model: nn.Module) -> float:
        return float(getattr(model.config, "router_z_loss_coef", 0.0))


def data_parallel_loss(outputs: dict[str, torch.Tensor], accelerator: Any) -> torch.Tensor:
    """The loss to back-propagate on this process so that the gradients data parallelism averages over the
    processes equal one process's on the whole global batch.

    Each process's micro-batch has its own number of real tokens and masked positions (examples vary in
    length), so the mean of per-process means is not the global batch's mean: the MLM and RTD losses and the
    router z-loss are divided by the counts summed over processes instead (and scaled by the number of
    processes, which the gradient averaging divides out). The Switch load-balancing loss, a product of two
    means over a process's own tokens, stays per process. Micro-batches of one gradient accumulation are
    still averaged with equal weights (accelerate divides each by their number).
    """
    processes = accelerator.num_processes
    if processes == 1:
        return outputs["loss"]
    counts = torch.stack([outputs["stats/masked"], outputs["stats/tokens"]])
    masked, tokens = accelerator.reduce(counts, reduction="sum").clamp(min=1.0).unbind()
    shared = outputs["loss_terms/masked_sum"] / masked + outputs["loss_terms/token_sum"] / tokens
    return processes * shared + outputs["loss_terms/per_process"]


@torch.no_grad()
def rtd_statistics(
    loss: torch.Tensor,
    gen_loss: torch.Tensor,
    disc_loss: torch.Tensor,
    router_loss: torch.Tensor,
    gen_out: Any,
    disc_out: Any,
    gen_logits: torch.Tensor,
    targets: torch.Tensor,
    disc_logits: torch.Tensor,
    disc_labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Detached sums and counts of one forward, summable over micro-batches and processes."""
    predicted = disc_logits > 0
    actual = disc_labels > 0.5
    stats = {
        "loss": loss.detach(),
        "gen_loss": gen_loss.detach(),
        "disc_loss": disc_loss.detach(),
        "router_loss": router_loss.detach(),
        "gen_router_loss": gen_out.router_loss.detach(),
        "disc_router_loss": disc_out.router_loss.detach(),
        "aux_loss": disc_out.aux_loss.detach(),
        "z_loss": disc_out.z_loss.detach(),
        "masked": torch.tensor(float(targets.numel()), device=loss.device),
        "gen_correct": (gen_logits.argmax(-1) == targets).sum().float(),
        "tokens": torch.tensor(float(disc_labels.numel()), device=loss.device),
        "disc_correct": (predicted == actual).sum().float(),
        "replaced": actual.sum().float(),
        "predicted_replaced": predicted.sum().float(),
        "true_positives": (predicted & actual).sum().float(),
    }
    for prefix, out in (("", disc_out), ("gen_", gen_out)):
        if out.expert_load is not None:
            stats |= {f"{prefix}{name}": getattr(out, name).detach().float() for name in ROUTER_STATISTICS}
    if gen_out.expert_load is not None:
        stats["gen_aux_loss"] = gen_out.aux_loss.detach()
        stats["gen_z_loss"] = gen_out.z_loss.detach()
    return stats


class MetricWindow:
    """Sums the model's statistics over micro-batches; `summary` reduces over processes into metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0

    def add(self, outputs: dict[str, torch.Tensor]) -> None:
        for name, value in outputs.items():
            if name.startswith("stats/"):
                key = name[len("stats/") :]
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.batches += 1

    def summary(self, accelerator: Any) -> dict[str, Any]:
        device = next(iter(self.sums.values())).device
        sums = dict(self.sums, batches=torch.tensor(float(self.batches), device=device))
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        batches = sums["batches"].item()
        mean = {name: (value / batches) for name, value in sums.items()}
        replaced, predicted, tp = (
            sums[k].item() for k in ("replaced", "predicted_replaced", "true_positives")
        )
        tokens = sums["tokens"].item()
        # Losses are means over the window's masked positions / real tokens on all processes, not means of
        # per-batch means (which would depend on how examples are split into batches and processes); only
        # the Switch load-balancing part of the router loss is a mean of per-batch values.
        masked, real = max(sums["masked"].item(), 1.0), max(tokens, 1.0)
        per_process = mean["per_process"].item()
        metrics: dict[str, Any] = {
            "loss": sums["masked_sum"].item() / masked + sums["token_sum"].item() / real + per_process,
            "gen_loss": sums["gen_loss_sum"].item() / masked,
            "disc_loss": sums["disc_loss_sum"].item() / real,
            "router_loss": sums["router_z_loss_sum"].item() / real + per_process,
            "gen_accuracy": sums["gen_correct"].item() / max(sums["masked"].item(), 1.0),
            "disc_accuracy": sums["disc_correct"].item() / max(tokens, 1.0),
            # Replaced-token F1 (positive class: replaced); 0 when nothing is predicted or replaced.
            "disc_f1": 2 * tp / max(replaced + predicted, 1.0),
            "disc_precision": tp / max(predicted, 1.0),
            "disc_recall": tp / max(replaced, 1.0),
            # Accuracy of always answering "original": what disc_accuracy must beat.
            "disc_baseline_accuracy": 1.0 - replaced / max(tokens, 1.0),
            "replaced_fraction": replaced / max(tokens, 1.0),
            "aux_loss": mean["aux_loss"].item(),
            "z_loss": mean["z_loss"].item(),
        }
        for name in (*ROUTER_STATISTICS, *(f"gen_{name}" for name in ROUTER_STATISTICS)):
            if name in mean:
                metrics[name] = mean[name].tolist()
        for name in ("gen_aux_loss", "gen_z_loss"):
            if name in mean:
                metrics[name] = mean[name].item()
        return metrics

    @property
    def tokens(self) -> float:
        return self.sums["tokens"].item() if "tokens" in self.sums else 0.0
