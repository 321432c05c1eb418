"""An fp64 reference for the MoE router that shares no code with `ElectraMoERouter`.

It computes the router's logits, softmax over all experts, top-k, the optional renormalisation, noisy
top-k (Shazeer et al. 2017) and multiplicative jitter (Switch Transformer) itself, from the router's
weights; only the random draws are taken from the production order (`router_draws`), so a test seeds
the reference and the block identically. Every MoE equivalence test (test_modeling, test_expert_choice)
compares the block against this, never against `block.router(...)`, so a router bug cannot hide in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RouterDraws:
    """The random numbers one training-mode router forward consumes (None where it draws nothing)."""

    jitter: torch.Tensor | None  # [tokens, hidden] multiplicative factors in [1 - eps, 1 + eps]
    noise: torch.Tensor | None  # [tokens, experts] standard normal draws (noisy top-k)


def router_draws(router, x: torch.Tensor, seed: int) -> RouterDraws:
    """Seed torch's global RNG with `seed` and draw what the production router draws, in its order
    (the jitter factors, then the noisy top-k noise) and dtype (x's, promoted to at least fp32).

    Before the block's forward the caller seeds again with the same `seed`, so both see the same numbers.
    """
    torch.manual_seed(seed)
    dtype = torch.promote_types(x.dtype, torch.float32)
    jitter = noise = None
    if router.training and router.jitter_noise > 0:
        eps = router.jitter_noise
        jitter = torch.empty(x.shape, dtype=dtype).uniform_(1.0 - eps, 1.0 + eps)
    if router.training and router.router_type == "noisy_topk":
        noise = torch.randn((x.shape[0], router.num_experts), dtype=dtype)
    return RouterDraws(jitter, noise)


@dataclass
class ReferenceRouting:
    logits: torch.Tensor  # [tokens, experts], fp64
    probs: torch.Tensor  # softmax over all experts, fp64
    gates: torch.Tensor | None  # [tokens, top_k], fp64 (None for expert choice)
    ids: torch.Tensor | None  # [tokens, top_k] expert ids, best first (None for expert choice)


def reference_routing(router, x: torch.Tensor, draws: RouterDraws | None = None) -> ReferenceRouting:
    """Route the rows of x ([tokens, hidden]) in fp64 from `router.weight` (and `noise_weight`).

    softmax_topk: gates = the k largest softmax probabilities, divided by their sum when norm_topk_prob.
    noisy_topk: selection logits = logits + noise * softplus(x @ noise_weight.T) while training (the
    logits alone in eval); gates = softmax over the k selected selection logits.
    expert_choice: no per-token choice (the experts choose, from `probs`).
    """
    draws = draws or RouterDraws(None, None)
    h = x.double()
    if draws.jitter is not None:
        h = h * draws.jitter.double()
    weight = router.weight.double()
    logits = torch.stack([h @ weight[e] for e in range(weight.shape[0])], dim=-1)
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    probs = shifted.exp() / shifted.exp().sum(dim=-1, keepdim=True)
    if router.router_type == "expert_choice":
        return ReferenceRouting(logits, probs, None, None)
    if router.router_type == "noisy_topk":
        selection = logits
        if draws.noise is not None:
            noise_std = torch.log1p(torch.exp(h @ router.noise_weight.double().t()))  # softplus
            selection = logits + draws.noise.double() * noise_std
        ids = sorted_top_k(selection, router.top_k)
        chosen = selection.gather(-1, ids)
        chosen = (chosen - chosen.max(dim=-1, keepdim=True).values).exp()
        return ReferenceRouting(logits, probs, chosen / chosen.sum(dim=-1, keepdim=True), ids)
    ids = sorted_top_k(probs, router.top_k)
    gates = probs.gather(-1, ids)
    if router.norm_topk_prob:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return ReferenceRouting(logits, probs, gates, ids)


def sorted_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[tokens, k]: the indices of each row's k largest scores, largest first (a full sort, not topk)."""
    return torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]


def reference_moe(block, hidden: torch.Tensor, token_mask: torch.Tensor | None = None, seed: int = 0):
    """Token by token: y_t = sum over kept choices of gate * expert(x_t); capacity in GShard priority
    order (all first choices, then all second choices, ...). Dropout is assumed off (p=0 or eval mode).

    Returns `(output, routing, aux_loss)`; the Switch load-balancing loss is computed over real tokens
    from the routed (pre-capacity) choices. In training mode the router's draws come from `seed`.
    """
    experts = block.experts
    x = hidden.reshape(-1, hidden.shape[-1])
    routing = reference_routing(block.router, x, router_draws(block.router, x, seed))
    valid = token_mask.reshape(-1) if token_mask is not None else torch.ones(x.shape[0], dtype=torch.bool)
    num_valid = int(valid.sum())
    capacity = None
    if block.capacity_factor is not None:
        capacity = math.ceil(block.capacity_factor * num_valid * block.top_k / block.num_experts)
    used = [0] * block.num_experts
    rows = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for choice in range(block.top_k):
        for t in range(x.shape[0]):
            if not valid[t]:
                continue
            e = int(routing.ids[t, choice])
            if capacity is not None and used[e] >= capacity:
                continue
            used[e] += 1
            h = experts.act(x[t] @ experts.weight_in[e] + experts.bias_in[e])
            gate = routing.gates[t, choice].to(x.dtype)
            rows[t] = rows[t] + gate * (h @ experts.weight_out[e] + experts.bias_out[e])
    y = torch.stack(rows)
    routed = torch.stack([(routing.ids[valid] == e).sum() for e in range(block.num_experts)]).double()
    aux = block.num_experts * (routed / (num_valid * block.top_k) * routing.probs[valid].mean(0)).sum()
    return block.LayerNorm(y.view_as(hidden) + hidden), routing, aux
