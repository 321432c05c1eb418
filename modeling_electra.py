"""ELECTRA whose feed-forward block is a top-k routed Mixture-of-Experts block in chosen layers.

Layers listed by `config.moe_layer_indices` get an `ElectraMoEBlock`; every other layer is transformers'
own `ElectraLayer`, so `num_experts=1` is plain ELECTRA with identical parameter names and outputs.

An MoE block reads as router -> slots sorted by expert -> experts -> combine: the router scores every
token; the routed (token, gate) pairs are sorted by expert (dropless by default, or cut to a capacity);
each expert runs once on its contiguous slice of them, and each token's gated expert outputs are summed
into the residual path. How the experts run (a loop with a hand-written backward, or `grouped_mm`) is in
`moe_dispatch.py`. Importing this module registers the classes with the transformers Auto classes under
`model_type="electra_moe"`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
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
from moe_dispatch import (
    GELU_APPROXIMATION,
    GROUPED_MM_ALIGNMENT,
    ExpertSlots,
    expert_choice_slots,
    experts_per_token_fraction,
    fused_grouped_mm_available,
    limit_capacity,
    run_experts_grouped_mm,
    run_experts_loop,
    sort_token_choice_slots,
)

__all__ = [
    "ElectraMoEConfig",
    "ElectraMoEModel",
    "ElectraMoEForPreTraining",
    "ElectraMoEForMaskedLM",
    "ElectraMoEForSequenceClassification",
    "make_generator_config",
]

IGNORE_INDEX = -100
# Parameters that only exist in MoE layers; a checkpoint lacking them would silently train fresh experts.
MOE_PARAMETER_PATTERN = re.compile(r"\.moe\.(experts|router|LayerNorm)\.")


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ElectraMoEModelOutput(ModelOutput):
    """Encoder output plus router losses and statistics (one row per MoE layer).

    `aux_loss` and `z_loss` are unweighted; `router_loss` is their weighted sum, the term the heads add to
    their task loss. For the dense model all three are zero tensors and the statistics are `None`; the
    statistics are described in `RouterOutput`.
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
    experts_per_token: torch.Tensor | None = None


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
    experts_per_token: torch.Tensor | None = None


# The per-MoE-layer router statistics, named once: the outputs above and RouterOutput carry them under these
# names, and the pretraining metrics (rtd.py) and TensorBoard tags derive theirs from this tuple.
ROUTER_STATISTICS = ("expert_load", "router_entropy", "dropped_fraction", "experts_per_token")
ROUTER_LOSSES = ("aux_loss", "z_loss", "router_loss")
ROUTER_FIELDS = (
    "router_logits",
    *ROUTER_LOSSES,
    *ROUTER_STATISTICS,
)  # the outputs' fields after hidden_states


@dataclass
class RouterOutput:
    """What one MoE layer reports about its routing.

    `expert_load`: each expert's share of the routed slots; `dropped_fraction`: token choice, the share of
    routed slots over capacity; expert choice, the share of real tokens no expert took;
    `experts_per_token`: [num_experts + 1], the share of real tokens processed by 0, 1, 2, ... experts.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor
    router_entropy: torch.Tensor
    dropped_fraction: torch.Tensor
    experts_per_token: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# MoE block: router -> slots sorted by expert -> experts -> combine (the dispatch is in moe_dispatch.py)
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
        """Return (logits, probabilities, top-k gates, top-k expert ids), all but ids in fp32 (or fp64).

        Expert choice has no per-token choice (gates and ids are None): `expert_choice_slots` selects.
        """
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x, self.weight.to(x.dtype))
            probs = logits.softmax(dim=-1)
            if self.router_type == "expert_choice":
                return logits, probs, None, None
            gates, top_ids = self.top_k_gates(x, logits, probs)
        return logits, probs, gates, top_ids

    def top_k_gates(
        self, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k gates and expert ids (noisy top-k: softmax over the noisy top-k logits)."""
        if self.router_type == "noisy_topk":
            selection_logits = logits
            if self.training:
                noise_std = F.softplus(F.linear(x, self.noise_weight.to(x.dtype)))
                selection_logits = logits + torch.randn_like(logits) * noise_std
            top_logits, top_ids = selection_logits.topk(self.top_k, dim=-1)
            return top_logits.softmax(dim=-1), top_ids
        gates, top_ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates, top_ids


class ElectraMoEExperts(nn.Module):
    """`num_experts` ELECTRA feed-forward networks stored as stacked weight tensors.

    Expert e computes `act(x @ weight_in[e] + bias_in[e]) @ weight_out[e] + bias_out[e]`, the same function
    as ELECTRA's `intermediate.dense` + `output.dense` (whose weights are the transposes). Both dispatch
    paths take the routed slots sorted by expert and return `sum over slots of gate * expert(x[token])`
    per token.
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

    def forward(self, x: torch.Tensor, slots: ExpertSlots, grouped_mm: bool) -> torch.Tensor:
        """[tokens, hidden]: each token's gate-weighted sum of its experts' outputs (0 if no expert took it)."""
        dtype = self.compute_dtype(x)
        weights = tuple(w.to(dtype) for w in (self.weight_in, self.bias_in, self.weight_out, self.bias_out))
        slots = replace(slots, gate=slots.gate.to(dtype))
        if grouped_mm:
            return run_experts_grouped_mm(x.to(dtype), slots, weights, self.act)
        return run_experts_loop(x.to(dtype), slots, weights, self.act, self.gelu_approximation)


class ElectraMoEBlock(nn.Module):
    """Router + experts + ELECTRA's `dropout` and `LayerNorm(ffn(x) + x)`: a drop-in for the dense FFN."""

    def __init__(self, config: ElectraMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.expert_choice = config.router_type == "expert_choice"
        self.expert_choice_scope = config.expert_choice_scope
        self.norm_topk_prob = config.norm_topk_prob
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

    def use_grouped_mm(self, device: torch.device, dtype: torch.dtype) -> bool:
        """`auto`: grouped_mm only where torch has a fused kernel for it (and sizes are aligned), else the loop."""
        if self.implementation == "auto":
            return self.grouped_mm_aligned and fused_grouped_mm_available(device, dtype)
        return self.implementation == "grouped_mm"

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterOutput]:
        """`token_mask` (bool, same leading shape as `hidden_states`) marks real tokens; padding is not routed."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        valid = token_mask.reshape(-1) if token_mask is not None else None
        logits, probs, gates, top_ids = self.router(x)
        if self.expert_choice:
            group_size = hidden_states.shape[-2] if self.expert_choice_scope == "sequence" else x.shape[0]
            routed = slots = expert_choice_slots(
                probs, valid, group_size, self.capacity_factor, self.norm_topk_prob
            )
        else:
            routed = sort_token_choice_slots(top_ids, gates, valid, self.num_experts)
            slots = routed if self.capacity_factor is None else limit_capacity(routed, self.capacity(routed))
        grouped_mm = self.use_grouped_mm(x.device, self.experts.compute_dtype(x))
        combined = self.experts(x, slots, grouped_mm)
        layer_output = self.LayerNorm(self.dropout(combined.view_as(hidden_states)) + hidden_states)
        return layer_output, self.router_statistics(logits, probs, valid, routed, slots)

    def capacity(self, routed: ExpertSlots) -> int:
        """Switch capacity: ceil(capacity_factor x routed slots / experts) slots per expert."""
        num_valid_tokens = routed.token.numel() // self.top_k
        return math.ceil(self.capacity_factor * num_valid_tokens * self.top_k / self.num_experts)

    def router_statistics(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        valid: torch.Tensor | None,
        routed: ExpertSlots,
        kept: ExpertSlots,
    ) -> RouterOutput:
        """Switch load-balancing loss (none for expert choice), ST-MoE z-loss and detached load statistics
        over real tokens."""
        num_tokens = logits.shape[0]
        if valid is not None:
            logits, probs = logits[valid], probs[valid]
        num_routed, num_kept = routed.token.numel(), kept.token.numel()
        total = max(num_routed, 1)
        fraction_routed = routed.counts.float() / total
        mean_prob = probs.mean(dim=0) if probs.shape[0] else probs.new_zeros(self.num_experts)
        if self.expert_choice:  # balanced by construction
            aux_loss = logits.new_zeros(())
        else:
            aux_loss = self.num_experts * torch.sum(fraction_routed * mean_prob)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean() if logits.shape[0] else logits.new_zeros(())
        with torch.no_grad():
            entropy = (
                -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
                if probs.shape[0]
                else probs.new_zeros(())
            )
            experts_per_token = experts_per_token_fraction(kept, valid, num_tokens)
            # torch.full, not torch.tensor: a fill kernel instead of a host-to-device copy that waits.
            dropped = torch.full((), 1.0 - num_kept / total if num_routed else 0.0, device=logits.device)
            if self.expert_choice:
                dropped = experts_per_token[0]
        return RouterOutput(
            logits, aux_loss, z_loss, fraction_routed.detach(), entropy, dropped, experts_per_token
        )


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
    # Every head averages its loss over the batch and ignores `num_items_in_batch`: transformers' Trainer must
    # then divide by the accumulation steps itself (it does not when a forward accepts **kwargs).
    accepts_loss_kwargs = False
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
        (the original study's baseline bug). Use `upcycling.upcycle_dense_to_moe` for that on purpose.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing_moe = sorted(k for k in info["missing_keys"] if MOE_PARAMETER_PATTERN.search("." + k))
        if missing_moe:
            raise ValueError(
                f"The checkpoint has no weights for {len(missing_moe)} MoE parameters (e.g. {missing_moe[:4]}); "
                "they would be trained from a random initialisation. Load the checkpoint with its own "
                "config (num_experts as saved), or convert a dense checkpoint with upcycling.upcycle_dense_to_moe()."
            )
        return (model, info) if want_info else model


def summarize_routers(routers: list[RouterOutput], config: ElectraMoEConfig, device: torch.device) -> dict:
    """Average the per-layer router losses and stack the per-layer statistics."""
    if not routers:
        zero = torch.zeros((), device=device)
        return dict(dict.fromkeys(ROUTER_FIELDS), **dict.fromkeys(ROUTER_LOSSES, zero))
    aux = torch.stack([r.aux_loss for r in routers]).mean()
    z = torch.stack([r.z_loss for r in routers]).mean()
    return dict(
        router_logits=tuple(r.logits for r in routers) if config.output_router_logits else None,
        aux_loss=aux,
        z_loss=z,
        router_loss=config.router_aux_loss_coef * aux + config.router_z_loss_coef * z,
        **{name: torch.stack([getattr(r, name) for r in routers]) for name in ROUTER_STATISTICS},
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


class ElectraFinetuningHead(nn.Module):
    """google-research/electra's fine-tuning head: the [CLS] hidden state, dropout 0.1, one dense layer.

    (`finetune/classification/classification_tasks.py`: `get_pooled_output()` is `sequence_output[:, 0]`.)
    """

    def __init__(self, config: ElectraMoEConfig):
        super().__init__()
        dropout = config.classifier_dropout if config.classifier_dropout is not None else 0.1
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(hidden_states[:, 0]))


class ElectraMoEForSequenceClassification(ElectraMoEPreTrainedModel):
    """A [CLS] classification head on the encoder; `num_labels=1` is regression (STS-B).

    `config.classifier_head` picks ELECTRA's head (`"electra"`) or transformers' (`"hf"`).
    """

    def __init__(self, config: ElectraMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraMoEModel(config)
        head = ElectraFinetuningHead if config.classifier_head == "electra" else ElectraClassificationHead
        self.classifier = head(config)
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


AutoConfig.register(ElectraMoEConfig.model_type, ElectraMoEConfig, exist_ok=True)
AutoModel.register(ElectraMoEConfig, ElectraMoEModel, exist_ok=True)
AutoModelForPreTraining.register(ElectraMoEConfig, ElectraMoEForPreTraining, exist_ok=True)
AutoModelForMaskedLM.register(ElectraMoEConfig, ElectraMoEForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    ElectraMoEConfig, ElectraMoEForSequenceClassification, exist_ok=True
)
