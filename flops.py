"""Model FLOPs of ELECTRA-MoE pretraining: one RTD step (generator + discriminator, forward and backward).

Used by bench/bench_pretrain.py (TFLOP/s and MFU) and by run_glue.py, which records the training FLOPs of
a pretraining checkpoint (step x FLOPs per step) for the GLUE-score-vs-compute curves.
"""

from __future__ import annotations

import rtd
from moe_dispatch import expert_choice_capacity


def masked_per_sequence(seq_len: int, mask_prob: float = rtd.MASK_PROB) -> int:
    """Positions `rtd.mask_tokens` masks in a sequence of `seq_len` real tokens (the benchmark has no padding)."""
    return max(1, min(rtd.max_predictions_per_seq(seq_len, mask_prob), round(mask_prob * seq_len)))


def expert_slots_per_token(config, batch: int, seq_len: int) -> float:
    """Expert FFNs each token runs through on average: top_k for token choice (dropless; a capacity limit
    can only drop slots, so this is the intended compute), and for expert choice every expert's
    `expert_choice_capacity` tokens per group (a sequence, or the batch) over the group's tokens (~ the
    capacity factor)."""
    if config.router_type != "expert_choice":
        return config.top_k
    group = seq_len if config.expert_choice_scope == "sequence" else batch * seq_len
    capacity = expert_choice_capacity(config.capacity_factor, group, config.num_experts)
    return config.num_experts * capacity / group


def encoder_flops_per_token(config, batch: int, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one `ElectraMoEModel`: the embedding projection (when
    embedding_size != hidden_size) and every layer's attention and dense or MoE feed-forward block."""
    h = config.hidden_size
    attention = 2 * 4 * h * h + 2 * 2 * seq_len * h  # Q, K, V, output projections; Q K^T and scores x V
    dense_ffn = 2 * 2 * h * config.intermediate_size
    router = 2 * h * config.num_experts * (2 if config.router_type == "noisy_topk" else 1)  # + noise logits
    expert_ffn = 2 * 2 * h * config.expert_intermediate_size
    moe_ffn = router + expert_slots_per_token(config, batch, seq_len) * expert_ffn
    moe_layers = len(config.moe_layer_indices)
    layers = config.num_hidden_layers * attention + moe_layers * moe_ffn
    layers += (config.num_hidden_layers - moe_layers) * dense_ffn
    projection = 2 * config.embedding_size * h if config.embedding_size != h else 0
    return layers + projection


def rtd_step_flops(
    disc_config, gen_config, batch: int, seq_len: int, mask_prob: float = rtd.MASK_PROB
) -> float:
    """Model FLOPs of one RTD training step on `batch` full sequences of `seq_len` tokens.

    Counted: the matmuls, at 2 FLOPs per multiply-add, of
    - both encoders on every token (`encoder_flops_per_token`): per layer the Q, K, V and output
      projections (4 x 2 h^2), the attention scores Q K^T and their product with V (2 x 2 seq_len h,
      all seq_len keys: the encoder is bidirectional), and the feed-forward block: dense 2 x 2 h i, or MoE
      with only the active experts (top_k x 2 x 2 h i_expert per token; expert choice its capacity, about
      capacity_factor x) plus the router (2 h E; twice with noisy top-k's noise logits); and the projection
      from the shared embeddings when embedding_size != h;
    - the generator's MLM head on the masked positions only, as `rtd.ElectraPretrainingModel` computes it
      (`masked_per_sequence` per sequence): dense h_gen -> embedding_size, then embedding_size -> vocabulary;
    - the discriminator head on every token: dense h -> h, then h -> 1.
    Forward plus backward is 3 x the forward (the backward computes the gradients of both each matmul's
    input and its weight). Not counted: embedding lookups, layer norms, softmax, activations, biases,
    dropout, the Gumbel sampling, the losses and the optimizer (elementwise work, not matmuls).
    """
    tokens = batch * seq_len
    h, e, v = disc_config.hidden_size, disc_config.embedding_size, disc_config.vocab_size
    discriminator = tokens * (encoder_flops_per_token(disc_config, batch, seq_len) + 2 * h * h + 2 * h)
    masked = batch * masked_per_sequence(seq_len, mask_prob)
    mlm_head = masked * (2 * gen_config.hidden_size * e + 2 * e * v)
    generator = tokens * encoder_flops_per_token(gen_config, batch, seq_len) + mlm_head
    return 3 * (discriminator + generator)
