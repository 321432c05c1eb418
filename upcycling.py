"""Upcycling: turn a dense ELECTRA (or `num_experts=1` ElectraMoE) checkpoint into an MoE one.

Two methods, both starting every expert of every MoE layer from the dense FFN (only the routers are new):

- `copy`, sparse upcycling (Komatsuzaki et al. 2023): every expert is an exact copy of the dense FFN.
- `drop`, Drop-Upcycling (Nakamura et al., ICLR 2025): as `copy`, then in each expert a random subset of
  `drop_ratio` of the intermediate neurons (their `weight_in` columns, `bias_in` entries and `weight_out`
  rows) is re-drawn from a normal distribution, a different subset per expert. As in the authors' code
  (github.com/Taishi-N324/Drop-Upcycling, conversions/drop_upcycling.py), the normal's mean and standard
  deviation are those of the dense weights being replaced, per matrix and per expert. Copies of one FFN
  get near-identical gradients under a near-uniform router; the re-drawn neurons break that symmetry.

The method, ratio and seed are recorded in the MoE config's `upcycling` entry (saved in config.json).
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from modeling_electra import (
    MOE_PARAMETER_PATTERN,
    ElectraMoEConfig,
    ElectraMoEExperts,
    ElectraMoEForMaskedLM,
    ElectraMoEForPreTraining,
    ElectraMoEForSequenceClassification,
    ElectraMoEModel,
    ElectraMoEPreTrainedModel,
)

UPCYCLE_METHODS = ("copy", "drop")
DEFAULT_DROP_RATIO = 0.5

_UPCYCLE_TARGETS = {
    "ElectraModel": ElectraMoEModel,
    "ElectraForPreTraining": ElectraMoEForPreTraining,
    "ElectraForMaskedLM": ElectraMoEForMaskedLM,
    "ElectraForSequenceClassification": ElectraMoEForSequenceClassification,
}
_UPCYCLE_TARGETS.update({cls.__name__: cls for cls in _UPCYCLE_TARGETS.values()})


def _check_shapes(dense_config, moe_config: ElectraMoEConfig) -> None:
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


def _check_method(method: str, drop_ratio: float) -> None:
    if method not in UPCYCLE_METHODS:
        raise ValueError(f"method must be one of {UPCYCLE_METHODS}, got {method!r}")
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio}")


def _normal_like(values: torch.Tensor, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Draws from a normal with the mean and standard deviation of `values` (the weights they replace)."""
    values = values.float()
    std = values.std(correction=1 if values.numel() > 1 else 0)
    return torch.normal(values.mean().item(), std.item(), size, generator=generator)


def drop_neurons(
    experts: ElectraMoEExperts, drop_ratio: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """Drop-Upcycling of one layer whose experts are copies of the dense FFN: re-draw a random subset of each
    expert's intermediate neurons (`weight_in[e][:, j]`, `bias_in[e][j]`, `weight_out[e][j, :]`).

    Keeps `round((1 - drop_ratio) * intermediate)` neurons per expert; returns each expert's re-drawn indices.
    """
    num_experts, hidden, intermediate = experts.weight_in.shape
    num_drop = intermediate - round((1.0 - drop_ratio) * intermediate)
    dropped = []
    for e in range(num_experts if num_drop > 0 else 0):
        idx = torch.randperm(intermediate, generator=generator)[:num_drop].sort().values
        w_in, b_in, w_out = experts.weight_in[e], experts.bias_in[e], experts.weight_out[e]
        w_in[:, idx] = _normal_like(w_in[:, idx], (hidden, num_drop), generator).to(w_in.dtype)
        b_in[idx] = _normal_like(b_in[idx], (num_drop,), generator).to(b_in.dtype)
        w_out[idx, :] = _normal_like(w_out[idx, :], (num_drop, hidden), generator).to(w_out.dtype)
        dropped.append(idx)
    return dropped


def _copy_dense_ffn(moe, dense_state: dict[str, torch.Tensor], src: str) -> None:
    """Every expert of one MoE block (and its LayerNorm) becomes the dense layer's FFN."""
    experts = moe.experts
    experts.weight_in.copy_(dense_state[src + "intermediate.dense.weight"].t().expand_as(experts.weight_in))
    experts.bias_in.copy_(dense_state[src + "intermediate.dense.bias"].expand_as(experts.bias_in))
    experts.weight_out.copy_(dense_state[src + "output.dense.weight"].t().expand_as(experts.weight_out))
    experts.bias_out.copy_(dense_state[src + "output.dense.bias"].expand_as(experts.bias_out))
    moe.LayerNorm.load_state_dict(
        {
            "weight": dense_state[src + "output.LayerNorm.weight"],
            "bias": dense_state[src + "output.LayerNorm.bias"],
        }
    )


@torch.no_grad()
def upcycle_dense_to_moe(
    dense_model: PreTrainedModel,
    moe_config: ElectraMoEConfig,
    method: str = "copy",
    drop_ratio: float = DEFAULT_DROP_RATIO,
    seed: int = 0,
) -> ElectraMoEPreTrainedModel:
    """An MoE model whose experts start from `dense_model`'s FFNs (`method`: "copy" or "drop", see above).

    `dense_model` is an ELECTRA or `num_experts=1` ElectraMoE model; `moe_config` must have the same
    dimensions (and `expert_intermediate_size == intermediate_size`). The routers are freshly initialised
    and the dropped neurons drawn from `seed`, so one seed gives one model (the global RNG is untouched).
    With "copy" and `norm_topk_prob=True` (or `top_k == num_experts`) the upcycled model computes the same
    function as the dense one; "drop" with `drop_ratio=0` equals "copy".
    """
    target_cls = _UPCYCLE_TARGETS.get(type(dense_model).__name__)
    if target_cls is None:
        raise ValueError(
            f"Cannot upcycle {type(dense_model).__name__}; expected one of {sorted(_UPCYCLE_TARGETS)}"
        )
    _check_shapes(dense_model.config, moe_config)
    _check_method(method, drop_ratio)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = target_cls(copy.deepcopy(moe_config))
    dense_state = dense_model.state_dict()
    missing, _ = model.load_state_dict(dense_state, strict=False)
    unexplained = [k for k in missing if not MOE_PARAMETER_PATTERN.search("." + k)]
    if unexplained:
        raise ValueError(f"The dense model lacks weights the MoE model needs: {unexplained[:8]}")
    encoder = model.encoder if isinstance(model, ElectraMoEModel) else model.electra.encoder
    prefix = "encoder." if isinstance(model, ElectraMoEModel) else "electra.encoder."
    generator = torch.Generator().manual_seed(seed)
    for i in moe_config.moe_layer_indices:
        moe = encoder.layer[i].moe
        _copy_dense_ffn(moe, dense_state, f"{prefix}layer.{i}.")
        if method == "drop":
            drop_neurons(moe.experts, drop_ratio, generator)
    model.config.upcycling = {
        "method": method,
        "drop_ratio": drop_ratio if method == "drop" else 0.0,
        "seed": seed,
    }
    return model
