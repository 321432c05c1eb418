"""ELECTRA whose feed-forward block is a top-k routed Mixture-of-Experts block in chosen layers.

Layers listed by `config.moe_layer_indices` get an `ElectraMoEBlock`; every other layer is transformers'
own `ElectraLayer`, so `num_experts=1` is plain ELECTRA with identical parameter names and outputs.

MoE dispatch is dropless by default: each (token, expert) assignment is sorted by expert and every expert
runs once on its contiguous slice, either in a Python loop over the slices (fastest on CPU) or with one
`torch.nn.functional.grouped_mm` call (the CUDA path). Importing this module registers the classes with
the transformers Auto classes under `model_type="electra_moe"`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.electra.modeling_electra import (
    ElectraClassificationHead,
    ElectraDiscriminatorPredictions,
    ElectraEmbeddings,
    ElectraGeneratorPredictions,
    ElectraLayer,
    ElectraPreTrainedModel,
)
from transformers.utils import ModelOutput

from modeling_electra_config import ElectraMoEConfig, make_generator_config

__all__ = [
    "ElectraMoEConfig",
    "ElectraMoEModel",
    "ElectraMoEForPreTraining",
    "ElectraMoEForMaskedLM",
    "ElectraMoEForSequenceClassification",
    "make_generator_config",
    "upcycle_dense_to_moe",
]

IGNORE_INDEX = -100
# grouped_mm needs 16-byte aligned rows: hidden and expert sizes must be multiples of 8 (bf16).
GROUPED_MM_ALIGNMENT = 8
# Parameters that only exist in MoE layers; a checkpoint lacking them would silently train fresh experts.
MOE_PARAMETER_PATTERN = re.compile(r"\.moe\.(experts|router|LayerNorm)\.")


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ElectraMoEModelOutput(ModelOutput):
    """Encoder output plus router losses and statistics (one row per MoE layer).

    `aux_loss` and `z_loss` are unweighted; `router_loss` is their weighted sum, the term the heads add to
    their task loss. For the dense model all three are zero tensors and the statistics are `None`.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    router_entropy: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | None = None


@dataclass
class ElectraMoEHeadOutput(ModelOutput):
    """Output of the pretraining, masked-LM and classification heads.

    `loss` already includes `router_loss` when labels are given.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    router_entropy: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | None = None


ROUTER_FIELDS = (
    "router_logits",
    "aux_loss",
    "z_loss",
    "router_loss",
    "expert_load",
    "router_entropy",
    "dropped_fraction",
)


@dataclass
class RouterOutput:
    """What one MoE layer reports about its routing."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor
    entropy: torch.Tensor
    dropped_fraction: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# MoE block
# ----------------------------------------------------------------------------------------------------------


class ElectraMoERouter(nn.Module):
    """Token-to-expert router, computed in (at least) fp32 whatever the autocast dtype (ST-MoE stability)."""

    def __init__(self, config: ElectraMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router_type = config.router_type
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if self.router_type == "noisy_topk":
            self.noise_weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (logits, probabilities, top-k gates, top-k expert ids), all but ids in fp32 (or fp64)."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x, self.weight.to(x.dtype))
            probs = logits.softmax(dim=-1)
            if self.router_type == "noisy_topk":
                selection_logits = logits
                if self.training:
                    noise_std = F.softplus(F.linear(x, self.noise_weight.to(x.dtype)))
                    selection_logits = logits + torch.randn_like(logits) * noise_std
                top_logits, top_ids = selection_logits.topk(self.top_k, dim=-1)
                gates = top_logits.softmax(dim=-1)
            else:
                gates, top_ids = probs.topk(self.top_k, dim=-1)
                if self.norm_topk_prob:
                    gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, gates, top_ids


def scatter_add_slots(x: torch.Tensor, slot_out: torch.Tensor, slot_token: torch.Tensor) -> torch.Tensor:
    """Sum the gated expert outputs of each token's slots into a [tokens, hidden] tensor (dropped: zero).

    `index_select` for the gather and an in-place `index_add_` here, rather than `x[idx]` and a copy: on CPU
    the backward of advanced indexing (an accumulating `index_put_`) is several times slower.
    """
    combined = torch.zeros(x.shape, dtype=slot_out.dtype, device=x.device)
    return combined.index_add_(0, slot_token, slot_out)


# Activations whose derivative the expert loop computes in closed form (`aten.gelu_backward`); any other
# activation is differentiated by re-running it under autograd in the backward pass.
GELU_APPROXIMATION = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}


def backward_may_free_saved_tensors() -> bool:
    """Whether the running backward pass frees the graph (`retain_graph=False`), so saved tensors may go.

    Asks autograd's engine through a private binding (present in the pinned torch); if it is missing the
    answer is "no", which only costs memory.
    """
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
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
        tokens = sorted_token.split(counts)
        weights_in, weights_out = weight_in.unbind(0), weight_out.unbind(0)
        grad_outs = grad_combined.index_select(0, sorted_token).split(counts)
        grad_gate = torch.empty_like(sorted_gate)
        grad_gates = grad_gate.split(counts)
        gates = sorted_gate.split(counts)
        grad_bias_in = weight_in.new_zeros(len(counts), weight_in.shape[2])
        grad_bias_out = weight_out.new_zeros(len(counts), weight_out.shape[2])

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

        full = len(active) == len(counts)
        grad_weight_out = torch.empty_like(weight_out) if full else torch.zeros_like(weight_out)
        for e in active:
            torch.mm(per_expert[e].pop().t(), grad_outs[e], out=grad_weight_out[e])
        del grad_outs

        grad_weight_in = torch.empty_like(weight_in) if full else torch.zeros_like(weight_in)
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


class ElectraMoEExperts(nn.Module):
    """`num_experts` ELECTRA feed-forward networks stored as stacked weight tensors.

    Expert e computes `act(x @ weight_in[e] + bias_in[e]) @ weight_out[e] + bias_out[e]`, the same function
    as ELECTRA's `intermediate.dense` + `output.dense` (whose weights are the transposes). Both dispatch
    paths take the routed slots sorted by expert (token index, gate, per-expert counts) and return
    `sum over slots of gate * expert(x[token])` per token.
    """

    def __init__(self, config: ElectraMoEConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.weight_in = nn.Parameter(torch.empty(e, h, i))
        self.bias_in = nn.Parameter(torch.empty(e, i))
        self.weight_out = nn.Parameter(torch.empty(e, i, h))
        self.bias_out = nn.Parameter(torch.empty(e, h))
        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.gelu_approximation = (
            GELU_APPROXIMATION.get(config.hidden_act) if isinstance(config.hidden_act, str) else None
        )

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype the experts run in: the autocast dtype when autocast is on (bf16 on GPU), else x's.

        `grouped_mm` is not autocast-aware, so without this it would run in fp32 under bf16 autocast.
        """
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def forward_loop(
        self, x: torch.Tensor, sorted_token: torch.Tensor, sorted_gate: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Each expert once on its contiguous slice of the sorted slots, in a Python loop (the CPU path)."""
        dtype = self.compute_dtype(x)
        return ExpertLoopFunction.apply(
            x.to(dtype),
            sorted_token,
            sorted_gate.to(dtype),
            self.weight_in.to(dtype),
            self.bias_in.to(dtype),
            self.weight_out.to(dtype),
            self.bias_out.to(dtype),
            counts,
            self.act,
            self.gelu_approximation,
        )

    def forward_grouped(
        self,
        x: torch.Tensor,
        sorted_token: torch.Tensor,
        sorted_gate: torch.Tensor,
        counts: torch.Tensor,
        sorted_expert: torch.Tensor,
    ) -> torch.Tensor:
        """All experts in two `grouped_mm` calls over the sorted slots (the CUDA bf16 path).

        No host sync: the group offsets stay on the device. Biases are added in place (grouped_mm's backward
        does not need its output), sparing a (tokens*top_k, intermediate) temporary.
        """
        dtype = self.compute_dtype(x)
        offsets = counts.cumsum(0).to(torch.int32)
        x_sorted = x.to(dtype).index_select(0, sorted_token)
        hidden = F.grouped_mm(x_sorted, self.weight_in.to(dtype), offs=offsets)
        hidden = self.act(hidden.add_(self.bias_in.to(dtype).index_select(0, sorted_expert)))
        out = F.grouped_mm(hidden, self.weight_out.to(dtype), offs=offsets)
        out = out.add_(self.bias_out.to(dtype).index_select(0, sorted_expert))
        return scatter_add_slots(x, out * sorted_gate.to(dtype).unsqueeze(-1), sorted_token)


class ElectraMoEBlock(nn.Module):
    """Router + experts + ELECTRA's `dropout` and `LayerNorm(ffn(x) + x)`: a drop-in for the dense FFN."""

    def __init__(self, config: ElectraMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.implementation = config.moe_implementation
        self.grouped_mm_aligned = all(
            size % GROUPED_MM_ALIGNMENT == 0 for size in (config.hidden_size, config.expert_intermediate_size)
        )
        if self.implementation == "grouped_mm" and not self.grouped_mm_aligned:
            raise ValueError(
                f"moe_implementation='grouped_mm' needs hidden_size ({config.hidden_size}) and "
                f"expert_intermediate_size ({config.expert_intermediate_size}) to be multiples of "
                f"{GROUPED_MM_ALIGNMENT}; use 'loop' or 'auto' (which falls back to the loop)"
            )
        self.router = ElectraMoERouter(config)
        self.experts = ElectraMoEExperts(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.implementation == "auto":
            return x.is_cuda and self.grouped_mm_aligned
        return self.implementation == "grouped_mm"

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterOutput]:
        """`token_mask` (bool, same leading shape as `hidden_states`) marks real tokens; padding is not routed."""
        hidden_size = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, hidden_size)
        num_tokens = x.shape[0]
        logits, probs, gates, top_ids = self.router(x)

        # Choice-major order (all first choices, then all second choices, ...): a stable sort by expert then
        # gives first choices priority when capacity is limited, as in GShard/Switch.
        slot_expert = top_ids.t().reshape(-1)
        slot_gate = gates.t().reshape(-1)
        slot_token = torch.arange(num_tokens, device=x.device).repeat(self.top_k)
        valid = token_mask.reshape(-1) if token_mask is not None else None
        if valid is not None:
            slot_valid = valid.repeat(self.top_k)
            slot_expert, slot_gate, slot_token = (
                slot_expert[slot_valid],
                slot_gate[slot_valid],
                slot_token[slot_valid],
            )
        num_routed = slot_expert.numel()

        order = torch.argsort(slot_expert, stable=True)
        sorted_expert = slot_expert.index_select(0, order)
        sorted_token = slot_token.index_select(0, order)
        sorted_gate = slot_gate.index_select(0, order)
        counts = torch.bincount(sorted_expert, minlength=self.num_experts)
        routed_counts = counts

        if self.capacity_factor is not None:
            num_valid_tokens = num_routed // self.top_k
            capacity = math.ceil(self.capacity_factor * num_valid_tokens * self.top_k / self.num_experts)
            starts = counts.cumsum(0) - counts
            position_in_expert = torch.arange(num_routed, device=x.device) - starts.index_select(
                0, sorted_expert
            )
            keep = position_in_expert < capacity
            sorted_expert, sorted_token, sorted_gate = (
                sorted_expert[keep],
                sorted_token[keep],
                sorted_gate[keep],
            )
            counts = counts.clamp(max=capacity)

        if self.use_grouped_mm(x):
            combined = self.experts.forward_grouped(x, sorted_token, sorted_gate, counts, sorted_expert)
        else:
            combined = self.experts.forward_loop(x, sorted_token, sorted_gate, counts.tolist())

        layer_output = self.LayerNorm(self.dropout(combined.view_as(hidden_states)) + hidden_states)
        router = self.router_statistics(logits, probs, valid, routed_counts, sorted_token.numel(), num_routed)
        return layer_output, router

    def router_statistics(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        valid: torch.Tensor | None,
        routed_counts: torch.Tensor,
        num_kept: int,
        num_routed: int,
    ) -> RouterOutput:
        """Switch load-balancing loss, ST-MoE z-loss and detached load statistics over real tokens."""
        if valid is not None:
            logits, probs = logits[valid], probs[valid]
        total = max(num_routed, 1)
        fraction_routed = routed_counts.float() / total
        mean_prob = probs.mean(dim=0) if probs.shape[0] else probs.new_zeros(self.num_experts)
        aux_loss = self.num_experts * torch.sum(fraction_routed * mean_prob)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean() if logits.shape[0] else logits.new_zeros(())
        with torch.no_grad():
            entropy = (
                -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
                if probs.shape[0]
                else probs.new_zeros(())
            )
            dropped = torch.tensor(1.0 - num_kept / total if num_routed else 0.0, device=logits.device)
        return RouterOutput(logits, aux_loss, z_loss, fraction_routed.detach(), entropy, dropped)


class ElectraMoELayer(ElectraLayer):
    """ELECTRA's layer (same attention submodules and names) with the FFN replaced by `ElectraMoEBlock`."""

    def __init__(self, config: ElectraMoEConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        del self.intermediate, self.output
        self.moe = ElectraMoEBlock(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, RouterOutput]:
        attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
        return self.moe(attention_output, token_mask)


class ElectraMoEEncoder(nn.Module):
    """A stack of dense `ElectraLayer`s and `ElectraMoELayer`s (same `layer.{i}` names as ELECTRA)."""

    def __init__(self, config: ElectraMoEConfig):
        super().__init__()
        self.config = config
        moe_layers = set(config.moe_layer_indices)
        self.layer = nn.ModuleList(
            [
                ElectraMoELayer(config, layer_idx=i) if i in moe_layers else ElectraLayer(config, layer_idx=i)
                for i in range(config.num_hidden_layers)
            ]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, list[RouterOutput]]:
        all_hidden = (hidden_states,) if output_hidden_states else None
        routers: list[RouterOutput] = []
        for layer in self.layer:
            if isinstance(layer, ElectraMoELayer):
                hidden_states, router = layer(hidden_states, attention_mask, token_mask=token_mask)
                routers.append(router)
            else:
                hidden_states = layer(hidden_states, attention_mask)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
        return hidden_states, all_hidden, routers


# ----------------------------------------------------------------------------------------------------------
# Pretrained models
# ----------------------------------------------------------------------------------------------------------


class ElectraMoEPreTrainedModel(ElectraPreTrainedModel):
    config_class = ElectraMoEConfig
    config: ElectraMoEConfig
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_record_outputs = None

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ElectraMoEExperts):
            init.normal_(module.weight_in, mean=0.0, std=std)
            init.normal_(module.weight_out, mean=0.0, std=std)
            init.zeros_(module.bias_in)
            init.zeros_(module.bias_out)
        elif isinstance(module, ElectraMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if hasattr(module, "noise_weight"):
                # Shazeer et al. (2017) start the noise projection at zero.
                init.zeros_(module.noise_weight)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load as transformers does, but refuse a checkpoint that lacks MoE weights.

        Without this check a dense checkpoint read into an MoE config trains freshly initialised experts
        (the original study's baseline bug). Use `upcycle_dense_to_moe` for that on purpose.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing_moe = sorted(k for k in info["missing_keys"] if MOE_PARAMETER_PATTERN.search("." + k))
        if missing_moe:
            raise ValueError(
                f"The checkpoint has no weights for {len(missing_moe)} MoE parameters (e.g. {missing_moe[:4]}); "
                "they would be trained from a random initialisation. Load the checkpoint with its own "
                "config (num_experts as saved), or convert a dense checkpoint with upcycle_dense_to_moe()."
            )
        return (model, info) if want_info else model


def summarize_routers(routers: list[RouterOutput], config: ElectraMoEConfig, device: torch.device) -> dict:
    """Average the per-layer router losses and stack the per-layer statistics."""
    if not routers:
        zero = torch.zeros((), device=device)
        return dict(router_logits=None, aux_loss=zero, z_loss=zero, router_loss=zero,
                    expert_load=None, router_entropy=None, dropped_fraction=None)  # fmt: skip
    aux = torch.stack([r.aux_loss for r in routers]).mean()
    z = torch.stack([r.z_loss for r in routers]).mean()
    return dict(
        router_logits=tuple(r.logits for r in routers) if config.output_router_logits else None,
        aux_loss=aux,
        z_loss=z,
        router_loss=config.router_aux_loss_coef * aux + config.router_z_loss_coef * z,
        expert_load=torch.stack([r.expert_load for r in routers]),
        router_entropy=torch.stack([r.entropy for r in routers]),
        dropped_fraction=torch.stack([r.dropped_fraction for r in routers]),
    )


class ElectraMoEModel(ElectraMoEPreTrainedModel):
    """The bare encoder: ELECTRA embeddings (+ projection when embedding_size != hidden_size) and layers."""

    def __init__(self, config: ElectraMoEConfig):
        super().__init__(config)
        self.embeddings = ElectraEmbeddings(config)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
        self.encoder = ElectraMoEEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ElectraMoEModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        embedding_output = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        if hasattr(self, "embeddings_project"):
            embedding_output = self.embeddings_project(embedding_output)
        token_mask = attention_mask.bool() if attention_mask is not None else None
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
        )
        hidden, all_hidden, routers = self.encoder(embedding_output, mask, token_mask, output_hidden_states)
        return ElectraMoEModelOutput(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            **summarize_routers(routers, self.config, hidden.device),
        )


def _head_output(
    loss: torch.Tensor | None, logits: torch.Tensor, encoder_out: ElectraMoEModelOutput
) -> ElectraMoEHeadOutput:
    if loss is not None:
        loss = loss + encoder_out.router_loss
    return ElectraMoEHeadOutput(
        loss=loss,
        logits=logits,
        hidden_states=encoder_out.hidden_states,
        **{name: getattr(encoder_out, name) for name in ROUTER_FIELDS},
    )


class ElectraMoEForPreTraining(ElectraMoEPreTrainedModel):
    """The ELECTRA discriminator: per-token replaced (1) / original (0) logits."""

    def __init__(self, config: ElectraMoEConfig):
        super().__init__(config)
        self.electra = ElectraMoEModel(config)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ElectraMoEHeadOutput:
        out = self.electra(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states
        )
        logits = self.discriminator_predictions(out.last_hidden_state)
        loss = None
        if labels is not None:
            if attention_mask is not None:
                active = attention_mask.bool()
                loss = F.binary_cross_entropy_with_logits(logits[active], labels[active].float())
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        return _head_output(loss, logits, out)


class ElectraMoEForMaskedLM(ElectraMoEPreTrainedModel):
    """The ELECTRA generator: a masked language model whose output layer is tied to its word embeddings."""

    _tied_weights_keys = {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}

    def __init__(self, config: ElectraMoEConfig):
        super().__init__(config)
        self.electra = ElectraMoEModel(config)
        self.generator_predictions = ElectraGeneratorPredictions(config)
        self.generator_lm_head = nn.Linear(config.embedding_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.generator_lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.generator_lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ElectraMoEHeadOutput:
        out = self.electra(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states
        )
        logits = self.generator_lm_head(self.generator_predictions(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.view(-1, self.config.vocab_size), labels.view(-1), ignore_index=IGNORE_INDEX
            )
        return _head_output(loss, logits, out)


class ElectraMoEForSequenceClassification(ElectraMoEPreTrainedModel):
    """ELECTRA's [CLS] classification head; `num_labels=1` is regression (STS-B)."""

    def __init__(self, config: ElectraMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraMoEModel(config)
        self.classifier = ElectraClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ElectraMoEHeadOutput:
        out = self.electra(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states
        )
        logits = self.classifier(out.last_hidden_state)
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = (
                    F.mse_loss(logits.squeeze(-1), labels.float().view(-1))
                    if self.num_labels == 1
                    else F.mse_loss(logits, labels)
                )
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        return _head_output(loss, logits, out)


# ----------------------------------------------------------------------------------------------------------
# Upcycling a dense checkpoint
# ----------------------------------------------------------------------------------------------------------

_UPCYCLE_TARGETS = {
    "ElectraModel": ElectraMoEModel,
    "ElectraForPreTraining": ElectraMoEForPreTraining,
    "ElectraForMaskedLM": ElectraMoEForMaskedLM,
    "ElectraForSequenceClassification": ElectraMoEForSequenceClassification,
}
_UPCYCLE_TARGETS.update({cls.__name__: cls for cls in _UPCYCLE_TARGETS.values()})


@torch.no_grad()
def upcycle_dense_to_moe(
    dense_model: PreTrainedModel, moe_config: ElectraMoEConfig
) -> ElectraMoEPreTrainedModel:
    """Sparse upcycling (Komatsuzaki et al. 2023): every expert starts as a copy of the dense FFN.

    `dense_model` is an ELECTRA or `num_experts=1` ElectraMoE model; `moe_config` must have the same
    dimensions (and `expert_intermediate_size == intermediate_size`). Only the routers are freshly
    initialised; with `norm_topk_prob=True` (or `top_k == num_experts`) the upcycled model computes the same
    function as the dense one.
    """
    target_cls = _UPCYCLE_TARGETS.get(type(dense_model).__name__)
    if target_cls is None:
        raise ValueError(
            f"Cannot upcycle {type(dense_model).__name__}; expected one of {sorted(_UPCYCLE_TARGETS)}"
        )
    dense_config = dense_model.config
    for field in ("hidden_size", "num_hidden_layers", "embedding_size", "vocab_size", "num_attention_heads"):
        if getattr(dense_config, field) != getattr(moe_config, field):
            raise ValueError(
                f"{field} differs: dense {getattr(dense_config, field)} vs MoE {getattr(moe_config, field)}"
            )
    if moe_config.expert_intermediate_size != dense_config.intermediate_size:
        raise ValueError(
            f"expert_intermediate_size ({moe_config.expert_intermediate_size}) must equal the dense "
            f"intermediate_size ({dense_config.intermediate_size}) to copy the FFN into every expert"
        )
    if getattr(dense_config, "num_experts", 1) != 1:
        raise ValueError("upcycle_dense_to_moe expects a dense model (num_experts=1)")

    model = target_cls(moe_config)
    dense_state = dense_model.state_dict()
    missing, _ = model.load_state_dict(dense_state, strict=False)
    encoder = model.encoder if isinstance(model, ElectraMoEModel) else model.electra.encoder
    prefix = "encoder." if isinstance(model, ElectraMoEModel) else "electra.encoder."
    for i in moe_config.moe_layer_indices:
        moe = encoder.layer[i].moe
        src = f"{prefix}layer.{i}."
        moe.experts.weight_in.copy_(
            dense_state[src + "intermediate.dense.weight"].t().unsqueeze(0).expand_as(moe.experts.weight_in)
        )
        moe.experts.bias_in.copy_(
            dense_state[src + "intermediate.dense.bias"].unsqueeze(0).expand_as(moe.experts.bias_in)
        )
        moe.experts.weight_out.copy_(
            dense_state[src + "output.dense.weight"].t().unsqueeze(0).expand_as(moe.experts.weight_out)
        )
        moe.experts.bias_out.copy_(
            dense_state[src + "output.dense.bias"].unsqueeze(0).expand_as(moe.experts.bias_out)
        )
        moe.LayerNorm.load_state_dict(
            {
                "weight": dense_state[src + "output.LayerNorm.weight"],
                "bias": dense_state[src + "output.LayerNorm.bias"],
            }
        )
    unexplained = [k for k in missing if not MOE_PARAMETER_PATTERN.search("." + k)]
    if unexplained:
        raise ValueError(f"The dense model lacks weights the MoE model needs: {unexplained[:8]}")
    return model


AutoConfig.register(ElectraMoEConfig.model_type, ElectraMoEConfig, exist_ok=True)
AutoModel.register(ElectraMoEConfig, ElectraMoEModel, exist_ok=True)
AutoModelForPreTraining.register(ElectraMoEConfig, ElectraMoEForPreTraining, exist_ok=True)
AutoModelForMaskedLM.register(ElectraMoEConfig, ElectraMoEForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    ElectraMoEConfig, ElectraMoEForSequenceClassification, exist_ok=True
)
