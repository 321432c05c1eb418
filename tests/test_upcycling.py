"""Drop-Upcycling: each expert keeps round((1 - r) * intermediate) of the dense FFN's neurons and re-draws the
rest from the dense weights' statistics, a different subset per expert; r = 0 is sparse upcycling (copy)."""

import pytest
import torch
from transformers import ElectraConfig, ElectraForPreTraining

from modeling_electra import ElectraMoEConfig
from test_modeling import TINY
from upcycling import upcycle_dense_to_moe

HIDDEN, INTERMEDIATE, EXPERTS = 32, 96, 4
SIZES = dict(TINY, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
# Far from the model's own N(0, 0.02) initialisation, so re-drawing from that instead would show.
STATS = {"intermediate.dense.weight": (0.05, 0.3), "intermediate.dense.bias": (-0.2, 0.1), "output.dense.weight": (-0.03, 0.5)}  # fmt: skip


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = ElectraForPreTraining(ElectraConfig(**SIZES)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            for suffix, (mean, std) in STATS.items():
                if name.endswith(suffix):
                    param.normal_(mean, std)
    return model


def upcycle(dense, method="drop", drop_ratio=0.5, seed=0):
    config = ElectraMoEConfig(**SIZES, num_experts=EXPERTS, top_k=2)
    return upcycle_dense_to_moe(dense, config, method=method, drop_ratio=drop_ratio, seed=seed)


def dense_ffn(dense, layer):
    """The dense layer's FFN in the experts' layout: weight_in [h, i], bias_in [i], weight_out [i, h]."""
    block = dense.electra.encoder.layer[layer]
    return (
        block.intermediate.dense.weight.t(),
        block.intermediate.dense.bias,
        block.output.dense.weight.t(),
    )


def dense_ffn_bias_out(dense, layer):
    return dense.electra.encoder.layer[layer].output.dense.bias


def kept_neurons(moe, dense, layer, expert):
    """Per neuron j: whether weight_in[:, j], bias_in[j] and weight_out[j, :] all equal the dense FFN's."""
    experts = moe.electra.encoder.layer[layer].moe.experts
    w_in, b_in, w_out = dense_ffn(dense, layer)
    return (
        (experts.weight_in[expert] == w_in).all(0)
        & (experts.bias_in[expert] == b_in)
        & (experts.weight_out[expert] == w_out).all(1)
    )


def redrawn_neurons(moe, dense, layer, expert):
    """Per neuron: whether all three parts differ from the dense FFN's (a re-drawn neuron differs everywhere)."""
    experts = moe.electra.encoder.layer[layer].moe.experts
    w_in, b_in, w_out = dense_ffn(dense, layer)
    return (
        (experts.weight_in[expert] != w_in).all(0)
        & (experts.bias_in[expert] != b_in)
        & (experts.weight_out[expert] != w_out).all(1)
    )


@pytest.mark.parametrize("ratio", [0.5, 0.25, 1.0])
def test_each_expert_keeps_exactly_the_undropped_neurons(dense, ratio):
    moe = upcycle(dense, drop_ratio=ratio, seed=1)
    kept_count = round((1 - ratio) * INTERMEDIATE)
    for layer in range(SIZES["num_hidden_layers"]):
        experts = moe.electra.encoder.layer[layer].moe.experts
        torch.testing.assert_close(experts.bias_out, dense_ffn_bias_out(dense, layer).expand(EXPERTS, -1))
        for e in range(EXPERTS):
            kept = kept_neurons(moe, dense, layer, e)
            assert int(kept.sum()) == kept_count
            assert bool((kept | redrawn_neurons(moe, dense, layer, e)).all()), "a neuron is half re-drawn"
    assert moe.config.upcycling == {"method": "drop", "drop_ratio": ratio, "seed": 1}


def test_experts_redraw_different_neurons(dense):
    moe = upcycle(dense, drop_ratio=0.5, seed=2)
    for layer in range(SIZES["num_hidden_layers"]):
        kept = [kept_neurons(moe, dense, layer, e) for e in range(EXPERTS)]
        # Two random halves of 96 neurons coincide with probability 1 / C(96, 48) ~ 1e-28.
        assert len({tuple(k.tolist()) for k in kept}) == EXPERTS
        experts = moe.electra.encoder.layer[layer].moe.experts
        assert not torch.equal(experts.weight_in[0], experts.weight_in[1])


def test_redrawn_weights_follow_the_dense_statistics(dense):
    """Pooled over experts and layers, the re-drawn values have the dense matrices' mean and std."""
    moe = upcycle(dense, drop_ratio=0.5, seed=3)
    for part, suffix in enumerate(STATS):
        drawn, original = [], []
        for layer in range(SIZES["num_hidden_layers"]):
            experts = moe.electra.encoder.layer[layer].moe.experts
            weights = (experts.weight_in, experts.bias_in, experts.weight_out)[part]
            for e in range(EXPERTS):
                redrawn = ~kept_neurons(moe, dense, layer, e)
                values = weights[e][:, redrawn] if part == 0 else weights[e][redrawn]
                drawn.append(values.flatten())
            original.append(dense_ffn(dense, layer)[part].flatten())
        drawn, original = torch.cat(drawn), torch.cat(original)
        mean, std = STATS[suffix]
        # Sampling error of the dense matrix's statistics and of the draws: a few std / sqrt(n) at most.
        tolerance = 5 * std / min(len(drawn), len(original)) ** 0.5
        assert abs(drawn.mean() - original.mean()) < tolerance, suffix
        assert abs(drawn.std() - original.std()) < tolerance * 2**0.5, suffix
        assert abs(original.mean() - mean) < tolerance and abs(original.std() - std) < 2 * tolerance


def test_zero_ratio_equals_copy_and_seed_fixes_the_model(dense):
    copied = upcycle(dense, method="copy", seed=4).state_dict()
    for name, tensor in upcycle(dense, method="drop", drop_ratio=0.0, seed=4).state_dict().items():
        assert torch.equal(tensor, copied[name]), name
    first, again = upcycle(dense, seed=5).state_dict(), upcycle(dense, seed=5).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = upcycle(dense, seed=6).state_dict()
    assert not torch.equal(first["electra.encoder.layer.0.moe.experts.weight_in"], other["electra.encoder.layer.0.moe.experts.weight_in"])  # fmt: skip
    assert not torch.equal(first["electra.encoder.layer.0.moe.router.weight"], other["electra.encoder.layer.0.moe.router.weight"])  # fmt: skip


def test_upcycling_leaves_the_global_rng_alone(dense):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    upcycle(dense, seed=8)
    torch.testing.assert_close(torch.rand(3), expected)


def test_bad_method_or_ratio_is_refused(dense):
    with pytest.raises(ValueError, match="method"):
        upcycle(dense, method="noise")
    with pytest.raises(ValueError, match="drop_ratio"):
        upcycle(dense, drop_ratio=1.5)
