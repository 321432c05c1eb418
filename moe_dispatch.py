"""MoE dispatch: the routed (token, gate) slots sorted by expert, and the two ways to run the experts on them.

Every router produces an `ExpertSlots`: an expert-major list of (token, gate) pairs with per-expert counts,
so expert e owns the e-th contiguous run of slots. Token-choice routing builds it with
`sort_token_choice_slots` (+ `limit_capacity`), expert-choice routing with `expert_choice_slots`. Then
either path computes `combined[t] = sum over slots (t, g, e) of g * expert_e(x[t])`:

- `run_experts_loop`: each expert once on its slice in a Python loop, with a hand-written backward
  (`ExpertLoopFunction`) that frees activations expert by expert (the CPU path);
- `run_experts_grouped_mm`: two `torch.nn.functional.grouped_mm` calls over all slices (the CUDA path;
  `fused_grouped_mm_available` says where torch has a fused kernel for it).

The only private torch API used here is behind `backward_may_free_saved_tensors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# grouped_mm needs 16-byte aligned rows: hidden and expert sizes must be multiples of 8 (bf16).
GROUPED_MM_ALIGNMENT = 8
# GPUs (compute capability major) where torch's grouped_mm has a fused bf16 kernel; elsewhere it runs a
# serial loop of `mm` with a device-to-host copy per group (pytorch/pytorch#186620).
FUSED_GROUPED_MM_CAPABILITIES = (9, 10)
FUSED_GROUPED_MM_DTYPE = torch.bfloat16
# Activations whose derivative the expert loop computes in closed form (`aten.gelu_backward`); any other
# activation is differentiated by re-running it under autograd in the backward pass.
GELU_APPROXIMATION = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}
# The private autograd binding that tells a backward pass whether its graph will be kept.
KEEP_GRAPH_BINDING = "_get_current_graph_task_keep_graph"


# ----------------------------------------------------------------------------------------------------------
# Sorted slots
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExpertSlots:
    """Routed (token, gate) pairs sorted by expert: expert e's slots are the e-th run of `counts[e]`.

    `token` (long) indexes the flattened tokens, `gate` weights the expert's output for it, `expert`
    (long, non-decreasing) repeats each expert id `counts[e]` times, `counts` is a [num_experts] long tensor.
    """

    token: torch.Tensor
    gate: torch.Tensor
    expert: torch.Tensor
    counts: torch.Tensor

    def select(self, keep: torch.Tensor, counts: torch.Tensor) -> ExpertSlots:
        """The slots where `keep` is true (still sorted by expert), with their new per-expert counts."""
        return ExpertSlots(self.token[keep], self.gate[keep], self.expert[keep], counts)


def sort_token_choice_slots(
    top_ids: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor | None, num_experts: int
) -> ExpertSlots:
    """Each token's top-k choices ([tokens, k] ids and gates) as slots sorted by expert; padding dropped.

    Choice-major order (all first choices, then all second choices, ...) and a stable sort by expert give
    first choices priority when capacity is limited, as in GShard/Switch.
    """
    num_tokens, top_k = top_ids.shape
    slot_expert = top_ids.t().reshape(-1)
    slot_gate = gates.t().reshape(-1)
    slot_token = torch.arange(num_tokens, device=top_ids.device).repeat(top_k)
    if valid is not None:
        slot_valid = valid.repeat(top_k)
        slot_expert, slot_gate, slot_token = (
            slot_expert[slot_valid],
            slot_gate[slot_valid],
            slot_token[slot_valid],
        )
    order = torch.argsort(slot_expert, stable=True)
    sorted_expert = slot_expert.index_select(0, order)
    # Not torch.bincount: on CUDA it reads the input's maximum back to the host (a sync every layer).
    counts = torch.zeros(num_experts, dtype=torch.long, device=sorted_expert.device)
    counts.index_add_(0, sorted_expert, torch.ones_like(sorted_expert))
    return ExpertSlots(
        slot_token.index_select(0, order), slot_gate.index_select(0, order), sorted_expert, counts
    )


def limit_capacity(slots: ExpertSlots, capacity: int) -> ExpertSlots:
    """Keep each expert's first `capacity` slots (Switch Transformer); the rest keep only the residual path."""
    starts = slots.counts.cumsum(0) - slots.counts
    position_in_expert = torch.arange(slots.token.numel(), device=slots.token.device) - starts.index_select(
        0, slots.expert
    )
    return slots.select(position_in_expert < capacity, slots.counts.clamp(max=capacity))


def expert_choice_capacity(capacity_factor: float, routable_tokens: int, num_experts: int) -> int:
    """Tokens each expert takes (Zhou et al. 2022): ceil(capacity_factor x routable tokens / experts), at most
    the routable tokens."""
    return min(math.ceil(capacity_factor * routable_tokens / num_experts), routable_tokens)


def expert_choice_slots(
    probs: torch.Tensor,
    valid: torch.Tensor | None,
    group_size: int,
    capacity_factor: float,
    normalize: bool,
) -> ExpertSlots:
    """Expert-choice routing: in every group of `group_size` consecutive tokens (a sequence, or the whole
    batch) each expert takes the `expert_choice_capacity` real tokens with the highest score for it.

    `probs` are [tokens, experts] scores; a slot's gate is the token's score for that expert, divided by the
    sum over the experts that took the token when `normalize`. Padding is never taken.
    """
    num_tokens, num_experts = probs.shape
    groups = num_tokens // group_size
    real = valid if valid is not None else torch.ones(num_tokens, dtype=torch.bool, device=probs.device)
    routable = real.view(groups, group_size).sum(1).tolist()
    capacities = [expert_choice_capacity(capacity_factor, n, num_experts) for n in routable]
    k = max(capacities, default=0)
    scores = probs.detach().masked_fill(~real.unsqueeze(-1), -math.inf).view(groups, group_size, num_experts)
    picked = scores.topk(k, dim=1).indices.permute(2, 0, 1)  # [experts, groups, k]
    keep = torch.arange(k, device=probs.device) < torch.tensor(capacities, device=probs.device).unsqueeze(-1)
    keep = keep.expand_as(picked)
    offsets = torch.arange(groups, device=probs.device).mul_(group_size).view(1, groups, 1)
    token = (picked + offsets)[keep]
    expert = torch.arange(num_experts, device=probs.device).view(-1, 1, 1).expand_as(picked)[keep]
    gate = probs.reshape(-1).index_select(0, token * num_experts + expert)
    if normalize:
        per_token = torch.zeros(num_tokens, dtype=gate.dtype, device=gate.device).index_add(0, token, gate)
        gate = gate / per_token.index_select(0, token).clamp_min(torch.finfo(gate.dtype).tiny)
    counts = torch.full((num_experts,), sum(capacities), dtype=torch.long, device=probs.device)
    return ExpertSlots(token, gate, expert, counts)


def experts_per_token_fraction(
    slots: ExpertSlots, valid: torch.Tensor | None, num_tokens: int
) -> torch.Tensor:
    """[num_experts + 1]: the fraction of real tokens processed by 0, 1, 2, ... experts (no host sync)."""
    num_experts = slots.counts.numel()
    per_token = torch.zeros(num_tokens, dtype=torch.long, device=slots.token.device)
    per_token.index_add_(0, slots.token, torch.ones_like(slots.token))
    weight = valid.float() if valid is not None else torch.ones(num_tokens, device=slots.token.device)
    histogram = torch.zeros(num_experts + 1, device=slots.token.device).index_add_(0, per_token, weight)
    return histogram / weight.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# Running the experts
# ----------------------------------------------------------------------------------------------------------


def fused_grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch has a fused `grouped_mm` kernel here: CUDA, compute capability 9.x/10.x, bf16."""
    if device.type != "cuda" or dtype != FUSED_GROUPED_MM_DTYPE:
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major in FUSED_GROUPED_MM_CAPABILITIES


def scatter_add_slots(x: torch.Tensor, slot_out: torch.Tensor, slot_token: torch.Tensor) -> torch.Tensor:
    """Sum the gated expert outputs of each token's slots into a [tokens, hidden] tensor (dropped: zero).

    `index_select` for the gather and an in-place `index_add_` here, rather than `x[idx]` and a copy: on CPU
    the backward of advanced indexing (an accumulating `index_put_`) is several times slower.
    """
    combined = torch.zeros(x.shape, dtype=slot_out.dtype, device=x.device)
    return combined.index_add_(0, slot_token, slot_out)


def run_experts_grouped_mm(
    x: torch.Tensor,
    slots: ExpertSlots,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """All experts in two `grouped_mm` calls over the sorted slots (`weights`: in, bias_in, out, bias_out).

    No host sync: the group offsets stay on the device. Biases are added in place (grouped_mm's backward
    does not need its output), sparing a (slots, intermediate) temporary.
    """
    weight_in, bias_in, weight_out, bias_out = weights
    offsets = slots.counts.cumsum(0).to(torch.int32)
    hidden = F.grouped_mm(x.index_select(0, slots.token), weight_in, offs=offsets)
    hidden = act(hidden.add_(bias_in.index_select(0, slots.expert)))
    out = F.grouped_mm(hidden, weight_out, offs=offsets)
    out = out.add_(bias_out.index_select(0, slots.expert))
    return scatter_add_slots(x, out * slots.gate.unsqueeze(-1), slots.token)


def run_experts_loop(
    x: torch.Tensor,
    slots: ExpertSlots,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor],
    gelu_approximation: str | None,
) -> torch.Tensor:
    """Each expert once on its contiguous slice of the sorted slots, in a Python loop (the CPU path)."""
    counts = slots.counts.tolist()
    return ExpertLoopFunction.apply(x, slots.token, slots.gate, *weights, counts, act, gelu_approximation)


def backward_may_free_saved_tensors() -> bool:
    """Whether the running backward pass frees the graph (`retain_graph=False`), so saved tensors may go.

    Asks autograd's engine through a private binding (present in the pinned torch; tests/test_moe_dispatch.py
    fails if it disappears). Without it the answer is "no", which keeps activations until the backward ends:
    correct gradients, more memory.
    """
    keep_graph = getattr(torch._C._autograd, KEEP_GRAPH_BINDING, None)
    return keep_graph is not None and not keep_graph()


class ExpertLoopFunction(torch.autograd.Function):
    """Forward and backward of every expert on its slice of the sorted slots, written out by hand.

    Autograd's version of the same loop (`unbind` the stacked weights, a graph per expert, `cat` the
    outputs) holds every expert's weight gradient and then stacks them into a second [E, H, I] buffer: at
    Base shapes with 16 experts its peak was 1.37x the dense layer's, and the copies cost time. Here each
    expert's gated output is added into the result while in cache, and the backward runs in three passes
    so that the stacked weight gradients are written in place by `mm(..., out=)` while the activations
    they are computed from are freed expert by expert (when the graph is not retained):
    1. gate gradient, gated output gradient, activation gradient (over the saved pre-activation), biases;
    2. `weight_out` gradient, freeing each expert's activation;
    3. `weight_in` gradient and each expert's input gradient, freeing its activation gradient.
    The input is saved rather than its sorted copy and gathered again per expert in pass 3. The per-expert
    activations live on `ctx` rather than in `save_for_backward` (which cannot free them one by one), so
    saved-tensor hooks such as `save_on_cpu` do not see them.
    """

    @staticmethod
    def forward(
        ctx, x, sorted_token, sorted_gate, weight_in, bias_in, weight_out, bias_out, counts, act, gelu
    ):
        combined = torch.zeros_like(x)
        per_expert = []
        experts = zip(
            sorted_token.split(counts),
            sorted_gate.split(counts),
            weight_in.unbind(0),
            bias_in.unbind(0),
            weight_out.unbind(0),
            bias_out.unbind(0),
            strict=True,
        )
        for token, gate, w_in, b_in, w_out, b_out in experts:
            if token.numel() == 0:
                per_expert.append(None)
                continue
            pre = torch.addmm(b_in, x.index_select(0, token), w_in)
            hidden = F.gelu(pre, approximate=gelu) if gelu else act(pre)
            out = torch.addmm(b_out, hidden, w_out)
            combined.index_add_(0, token, out * gate.unsqueeze(-1))
            per_expert.append([pre, hidden, out])
        ctx.counts, ctx.act, ctx.gelu, ctx.per_expert = counts, act, gelu, per_expert
        ctx.save_for_backward(x, sorted_token, sorted_gate, weight_in, weight_out)
        return combined

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_combined):
        x, sorted_token, sorted_gate, weight_in, weight_out = ctx.saved_tensors
        counts = ctx.counts
        free = backward_may_free_saved_tensors()
        per_expert = ctx.per_expert
        if free:
            ctx.per_expert = None
        else:
            per_expert = [None if saved is None else list(saved) for saved in per_expert]
        active = [e for e, saved in enumerate(per_expert) if saved is not None]
        grad_outs = grad_combined.index_select(0, sorted_token).split(counts)
        grad_gate = torch.empty_like(sorted_gate)
        grad_bias_in = weight_in.new_zeros(len(counts), weight_in.shape[2])
        grad_bias_out = weight_out.new_zeros(len(counts), weight_out.shape[2])
        _activation_gradients(
            ctx, per_expert, active, grad_outs, sorted_gate.split(counts), grad_gate.split(counts),
            weight_out.unbind(0), grad_bias_in, grad_bias_out, free,
        )  # fmt: skip

        full = len(active) == len(counts)
        grad_weight_out = torch.empty_like(weight_out) if full else torch.zeros_like(weight_out)
        for e in active:
            torch.mm(per_expert[e].pop().t(), grad_outs[e], out=grad_weight_out[e])
        del grad_outs

        grad_weight_in = torch.empty_like(weight_in) if full else torch.zeros_like(weight_in)
        grad_x = _input_gradients(
            x, per_expert, active, sorted_token.split(counts), weight_in, grad_weight_in
        )
        return (
            grad_x,
            None,
            grad_gate,
            grad_weight_in,
            grad_bias_in,
            grad_weight_out,
            grad_bias_out,
            None,
            None,
            None,
        )


def _activation_gradients(
    ctx, per_expert, active, grad_outs, gates, grad_gates, weights_out, grad_bias_in, grad_bias_out, free
) -> None:
    """Backward pass 1: per expert, the gate and bias gradients, the gated output gradient (in place in
    `grad_outs`) and the pre-activation gradient, which replaces the expert's saved [pre, hidden, out]
    by [grad_pre, hidden]."""
    for e in active:
        pre, hidden, out = per_expert[e]
        grad_out = grad_outs[e]
        torch.sum(grad_out * out, dim=-1, out=grad_gates[e])
        grad_out.mul_(gates[e].unsqueeze(-1))
        torch.sum(grad_out, dim=0, out=grad_bias_out[e])
        grad_hidden = torch.mm(grad_out, weights_out[e].t())
        if ctx.gelu:
            grad_pre = torch.ops.aten.gelu_backward.grad_input(
                grad_hidden, pre, approximate=ctx.gelu, grad_input=pre if free else torch.empty_like(pre)
            )
        else:
            with torch.enable_grad():
                leaf = pre.detach().requires_grad_()
                (grad_pre,) = torch.autograd.grad(ctx.act(leaf), leaf, grad_hidden)
        torch.sum(grad_pre, dim=0, out=grad_bias_in[e])
        per_expert[e] = [grad_pre, hidden]
        del pre, hidden, out, grad_out, grad_hidden, grad_pre


def _input_gradients(x, per_expert, active, tokens, weight_in, grad_weight_in) -> torch.Tensor:
    """Backward pass 3: each expert's `weight_in` gradient (into `grad_weight_in`) and input gradient,
    freeing its pre-activation gradient; returns the input gradient summed over each token's slots."""
    weights_in = weight_in.unbind(0)
    grad_chunks = []
    for e in active:
        (grad_pre,) = per_expert[e]
        per_expert[e] = None
        torch.mm(x.index_select(0, tokens[e]).t(), grad_pre, out=grad_weight_in[e])
        grad_chunks.append(torch.mm(grad_pre, weights_in[e].t()))
        del grad_pre
    grad_x = torch.zeros_like(x)
    for e, grad_chunk in zip(active, grad_chunks, strict=True):
        grad_x.index_add_(0, tokens[e], grad_chunk)
    return grad_x
