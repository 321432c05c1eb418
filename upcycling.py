"""Sparse upcycling: turn a dense ELECTRA (or `num_experts=1` ElectraMoE) checkpoint into an MoE one.

Every expert of every MoE layer starts from the dense FFN's weights; only the routers are new.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from modeling_electra import (
    MOE_PARAMETER_PATTERN,
    ElectraMoEConfig,
    ElectraMoEForMaskedLM,
    ElectraMoEForPreTraining,
    ElectraMoEForSequenceClassification,
    ElectraMoEModel,
    ElectraMoEPreTrainedModel,
)

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
