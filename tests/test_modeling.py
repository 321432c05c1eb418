"""Model tests: dense equivalence with transformers' ELECTRA, MoE routing against a per-token reference,
router losses, checkpoints and upcycling."""

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
    ElectraForSequenceClassification,
)

from modeling_electra import (
    ElectraMoEBlock,
    ElectraMoEConfig,
    ElectraMoEForMaskedLM,
    ElectraMoEForPreTraining,
    ElectraMoEForSequenceClassification,
    ElectraMoEModel,
)
from modeling_electra_config import PRESETS, make_generator_config, preset_name
from moe_reference import reference_moe, reference_routing
from upcycling import upcycle_dense_to_moe

TINY = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    embedding_size=16,
    max_position_embeddings=64,
)


def moe_config(**overrides) -> ElectraMoEConfig:
    return ElectraMoEConfig(**{**TINY, "num_experts": 4, "top_k": 2, **overrides})


def batch(batch_size=3, seq_len=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, TINY["vocab_size"], (batch_size, seq_len), generator=g)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    attention_mask[0, seq_len - 4 :] = 0
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------------
# num_experts=1 is plain ELECTRA
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        (ElectraMoEForPreTraining, ElectraForPreTraining, {}),
        (ElectraMoEForSequenceClassification, ElectraForSequenceClassification, {"num_labels": 3}),
        (ElectraMoEForMaskedLM, ElectraForMaskedLM, {}),
    ],
)
def test_dense_equals_transformers_electra(ours, theirs, kwargs):
    torch.manual_seed(0)
    model = ours(ElectraMoEConfig(**TINY, **kwargs)).eval()
    reference = theirs(ElectraConfig(**TINY, **kwargs)).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.state_dict())
    input_ids, attention_mask = batch()
    with torch.no_grad():
        ours_out = model(input_ids, attention_mask=attention_mask)
        ref_out = reference(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(ours_out.logits, ref_out.logits, rtol=0, atol=0)
    assert ours_out.aux_loss.item() == 0.0 and ours_out.expert_load is None


def test_dense_checkpoint_loads_into_transformers_electra(tmp_path):
    model = ElectraMoEForPreTraining(ElectraMoEConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    reference = ElectraForPreTraining.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids, attention_mask=attention_mask).logits,
            reference(input_ids, attention_mask=attention_mask).logits,
        )


# ---------------------------------------------------------------------------------------------------------
# The MoE block against a straightforward per-token reference whose router is computed independently
# (tests/moe_reference.py: fp64 logits, softmax, top-k, renormalisation, noise and jitter from the weights)
# ---------------------------------------------------------------------------------------------------------


def make_block(seed=0, **overrides) -> ElectraMoEBlock:
    torch.manual_seed(seed)
    model = ElectraMoEModel(moe_config(**overrides))
    return model.encoder.layer[0].moe.eval()


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (4, 2), (4, 3), (4, 4), (8, 2)])
def test_moe_block_matches_reference(implementation, num_experts, top_k):
    block = make_block(num_experts=num_experts, top_k=top_k, moe_implementation=implementation)
    hidden = torch.randn(2, 7, TINY["hidden_size"])
    with torch.no_grad():
        out, router = block(hidden)
        torch.testing.assert_close(out, reference_moe(block, hidden)[0], rtol=1e-5, atol=1e-5)
    assert router.expert_load.sum().item() == pytest.approx(1.0)
    assert router.dropped_fraction.item() == 0.0


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
def test_experts_without_tokens(implementation):
    """Three tokens, top-1, 8 experts: at least five experts get nothing and must not break anything."""
    block = make_block(num_experts=8, top_k=1, moe_implementation=implementation)
    hidden = torch.randn(1, 3, TINY["hidden_size"])
    with torch.no_grad():
        out, router = block(hidden)
        torch.testing.assert_close(out, reference_moe(block, hidden)[0], rtol=1e-5, atol=1e-5)
    assert (router.expert_load == 0).sum() >= 5


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_limited_routing_matches_reference(implementation, capacity_factor):
    block = make_block(
        num_experts=4, top_k=2, capacity_factor=capacity_factor, moe_implementation=implementation
    )
    # A router biased towards expert 0 overflows its capacity.
    with torch.no_grad():
        block.router.weight[0] += 2.0
    hidden = torch.randn(3, 8, TINY["hidden_size"]) + 0.5
    token_mask = torch.ones(3, 8, dtype=torch.bool)
    token_mask[1, 5:] = False
    with torch.no_grad():
        out, router = block(hidden, token_mask)
        expected, _, expected_aux = reference_moe(block, hidden, token_mask)
    valid = token_mask.unsqueeze(-1).expand_as(out)
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(router.aux_loss.double(), expected_aux, rtol=1e-5, atol=1e-6)
    assert router.dropped_fraction.item() > 0


ROUTERS = {
    "softmax_topk": dict(router_type="softmax_topk"),
    "softmax_topk-renormalised": dict(router_type="softmax_topk", norm_topk_prob=True),
    "softmax_topk-jitter": dict(router_type="softmax_topk", router_jitter_noise=0.3),
    "noisy_topk": dict(router_type="noisy_topk"),
    "noisy_topk-jitter": dict(router_type="noisy_topk", router_jitter_noise=0.3),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("router_kwargs", ROUTERS.values(), ids=ROUTERS)
def test_router_and_block_match_the_independent_reference(router_kwargs, training):
    """Logits, probabilities, gates, expert ids, output and load-balancing loss against the fp64 reference;
    in training the block and the reference draw the same jitter and noise from one seed."""
    block = make_block(seed=1, num_experts=6, top_k=2, hidden_dropout_prob=0.0, **router_kwargs)
    block.train(training)
    with torch.no_grad():  # spread-out gates, so renormalisation and the softmax's placement both show
        block.router.weight.normal_(0.0, 0.3)
        if hasattr(block.router, "noise_weight"):
            block.router.noise_weight.normal_(0.0, 0.3)
    hidden = torch.randn(2, 9, TINY["hidden_size"])
    token_mask = torch.ones(2, 9, dtype=torch.bool)
    token_mask[1, 6:] = False
    x = hidden.reshape(-1, TINY["hidden_size"])
    with torch.no_grad():
        expected, routing, expected_aux = reference_moe(block, hidden, token_mask, seed=5)
        torch.manual_seed(5)
        logits, probs, gates, ids = block.router(x)
        torch.manual_seed(5)
        out, stats = block(hidden, token_mask)
    torch.testing.assert_close(logits.double(), routing.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.double(), routing.probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, routing.ids)
    torch.testing.assert_close(gates.double(), routing.gates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[token_mask], expected[token_mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.aux_loss.double(), expected_aux, rtol=1e-5, atol=1e-6)
    if not router_kwargs.get("norm_topk_prob") and router_kwargs["router_type"] == "softmax_topk":
        assert (gates.sum(-1) < 0.99).all()  # raw top-k probabilities: renormalising would change them
    draws = router_kwargs.get("router_jitter_noise") or router_kwargs["router_type"] == "noisy_topk"
    if training and draws:
        quiet = reference_routing(block.router, x)  # the draws must matter, or the test checks nothing
        assert not torch.allclose(quiet.gates, routing.gates, atol=1e-3)


def test_grouped_and_loop_paths_agree_with_gradients():
    hidden = torch.randn(2, 9, TINY["hidden_size"])
    results = []
    for implementation in ("loop", "grouped_mm"):
        block = make_block(seed=3, num_experts=4, top_k=2, moe_implementation=implementation).train()
        block.dropout.p = 0.0
        x = hidden.clone().requires_grad_(True)
        out, router = block(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().add(router.aux_loss).backward()
        results.append((out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-4, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_dropless_output_independent_of_batch_companions():
    torch.manual_seed(0)
    model = ElectraMoEForPreTraining(moe_config(num_experts=4, top_k=1)).eval()
    input_ids, attention_mask = batch(batch_size=4, seq_len=12, seed=1)
    with torch.no_grad():
        together = model(input_ids, attention_mask=attention_mask).logits
        for i in range(input_ids.shape[0]):
            alone = model(input_ids[i : i + 1], attention_mask=attention_mask[i : i + 1]).logits
            keep = attention_mask[i].bool()
            torch.testing.assert_close(alone[0, keep], together[i, keep], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Gradients and router losses
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router_type", ["softmax_topk", "noisy_topk"])
def test_gradients_reach_router_and_every_expert(router_type):
    torch.manual_seed(0)
    model = ElectraMoEForPreTraining(moe_config(num_experts=4, top_k=2, router_type=router_type)).train()
    input_ids, attention_mask = batch(batch_size=4, seq_len=16)
    labels = torch.randint(0, 2, input_ids.shape)
    model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, (
            f"{name} is not part of the graph (DDP would need find_unused_parameters)"
        )
    for layer in model.electra.encoder.layer:
        moe = layer.moe
        assert moe.router.weight.grad.abs().sum() > 0
        if router_type == "noisy_topk":
            assert moe.router.noise_weight.grad.abs().sum() > 0
        for name in ("weight_in", "bias_in", "weight_out", "bias_out"):
            per_expert = getattr(moe.experts, name).grad.flatten(1).abs().sum(1)
            assert (per_expert > 0).all(), f"{name}: an expert got no gradient {per_expert}"


def test_aux_and_z_losses_match_hand_computation():
    block = make_block(num_experts=4, top_k=2)
    hidden = torch.randn(2, 5, TINY["hidden_size"])
    token_mask = torch.ones(2, 5, dtype=torch.bool)
    token_mask[0, 3:] = False
    _, router = block(hidden, token_mask)

    x = hidden.reshape(-1, TINY["hidden_size"])[token_mask.reshape(-1)]
    logits = x @ block.router.weight.t()
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1).indices
    counts = torch.stack([(top == e).sum() for e in range(4)]).float()
    fraction = counts / (x.shape[0] * 2)
    expected_aux = 4 * (fraction * probs.mean(0)).sum()
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router.aux_loss, expected_aux)
    torch.testing.assert_close(router.z_loss, expected_z)
    torch.testing.assert_close(router.expert_load, fraction)
    expected_entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(router.router_entropy, expected_entropy)


def test_head_loss_includes_weighted_router_losses():
    torch.manual_seed(0)
    config = moe_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = ElectraMoEForSequenceClassification(config).eval()
    input_ids, attention_mask = batch()
    labels = torch.tensor([0, 1, 1])
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    task_loss = torch.nn.functional.cross_entropy(out.logits, labels)
    assert out.aux_loss > 0 and out.z_loss > 0
    torch.testing.assert_close(out.router_loss, 0.5 * out.aux_loss + 0.25 * out.z_loss)
    torch.testing.assert_close(out.loss, task_loss + out.router_loss)
    assert out.expert_load.shape == (2, 4) and out.router_entropy.shape == (2,)


def test_regression_head_for_stsb():
    model = ElectraMoEForSequenceClassification(moe_config(num_labels=1)).eval()
    input_ids, attention_mask = batch()
    labels = torch.tensor([0.5, 3.0, 4.5])
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(
        out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels) + out.router_loss
    )


def test_moe_layer_selection():
    assert moe_config(num_hidden_layers=4, moe_layer_frequency=2).moe_layer_indices == [1, 3]
    config = moe_config(num_hidden_layers=4, moe_layers=[0, 2])
    model = ElectraMoEModel(config)
    kinds = [hasattr(layer, "moe") for layer in model.encoder.layer]
    assert kinds == [True, False, True, False]
    assert ElectraMoEConfig(**TINY, num_experts=1).moe_layer_indices == []


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and upcycling
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auto_cls, cls",
    [
        (AutoModel, ElectraMoEModel),
        (AutoModelForPreTraining, ElectraMoEForPreTraining),
        (AutoModelForMaskedLM, ElectraMoEForMaskedLM),
        (AutoModelForSequenceClassification, ElectraMoEForSequenceClassification),
    ],
)
def test_save_and_auto_load_round_trip_is_exact(tmp_path, auto_cls, cls):
    torch.manual_seed(0)
    model = cls(moe_config(num_experts=4, top_k=2, capacity_factor=1.25)).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "electra_moe"
    loaded = auto_cls.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    assert (
        loaded.config.num_experts == 4 and loaded.config.top_k == 2 and loaded.config.capacity_factor == 1.25
    )
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    input_ids, attention_mask = batch()
    with torch.no_grad():
        a = model(input_ids, attention_mask=attention_mask)
        b = loaded(input_ids, attention_mask=attention_mask)
    key = "last_hidden_state" if cls is ElectraMoEModel else "logits"
    assert torch.equal(a[key], b[key])


def test_generator_lm_head_is_tied():
    model = ElectraMoEForMaskedLM(moe_config())
    assert model.generator_lm_head.weight is model.electra.embeddings.word_embeddings.weight


def test_dense_checkpoint_read_as_moe_is_refused(tmp_path):
    ElectraMoEForPreTraining(ElectraMoEConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="upcycle_dense_to_moe"):
        ElectraMoEForPreTraining.from_pretrained(tmp_path, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="MoE parameters"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_experts=4, top_k=2)


def test_misshaped_experts_are_refused(tmp_path):
    ElectraMoEForPreTraining(moe_config(num_experts=4)).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)size|shape"):
        ElectraMoEForPreTraining.from_pretrained(tmp_path, num_experts=8)


@pytest.mark.parametrize("dense_cls", [ElectraForPreTraining, ElectraMoEForSequenceClassification])
def test_upcycling_reproduces_dense_outputs(tmp_path, dense_cls):
    torch.manual_seed(0)
    config_cls = ElectraConfig if dense_cls is ElectraForPreTraining else ElectraMoEConfig
    dense = dense_cls(config_cls(**TINY, num_labels=2)).eval()
    dense.save_pretrained(tmp_path / "dense")
    dense = dense_cls.from_pretrained(tmp_path / "dense").eval()
    upcycled = upcycle_dense_to_moe(
        dense, moe_config(num_experts=4, top_k=2, norm_topk_prob=True, num_labels=2)
    ).eval()
    assert upcycled.config.num_experts == 4
    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = dense(input_ids, attention_mask=attention_mask).logits
        got = upcycled(input_ids, attention_mask=attention_mask).logits
    # Padding is not routed in MoE layers, so only real tokens are comparable.
    real = attention_mask.bool() if dense_cls is ElectraForPreTraining else slice(None)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    upcycled.save_pretrained(tmp_path / "moe")
    reloaded = (
        AutoModelForPreTraining if dense_cls is ElectraForPreTraining else AutoModelForSequenceClassification
    )
    with torch.no_grad():
        again = (
            reloaded.from_pretrained(tmp_path / "moe").eval()(input_ids, attention_mask=attention_mask).logits
        )
    torch.testing.assert_close(again[real], expected[real], rtol=1e-5, atol=1e-5)


def test_upcycling_rejects_incompatible_shapes():
    dense = ElectraForPreTraining(ElectraConfig(**TINY))
    with pytest.raises(ValueError, match="expert_intermediate_size"):
        upcycle_dense_to_moe(dense, moe_config(expert_intermediate_size=32))


# ---------------------------------------------------------------------------------------------------------
# Config validation, presets, generator
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 4, "top_k": 0}, "top_k"),
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"router_type": "hash"}, "router_type"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"num_experts": 2, "moe_layers": [0, 2]}, "moe_layers"),
        ({"num_experts": 2, "moe_layers": [-1]}, "moe_layers"),
        ({"moe_implementation": "triton"}, "moe_implementation"),
        ({"moe_layer_frequency": 0}, "moe_layer_frequency"),
    ],
)
def test_invalid_config_values_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        ElectraMoEConfig(**{**TINY, **overrides})


def test_top_k_clipped_only_for_dense():
    assert ElectraMoEConfig(**TINY, num_experts=1, top_k=2).top_k == 1
    assert ElectraMoEConfig(**TINY, num_experts=4, top_k=2).top_k == 2


def test_presets_and_generator_sizes():
    small = ElectraMoEConfig.from_preset("small", vocab_size=30522)
    base = ElectraMoEConfig.from_preset("base", vocab_size=30522, num_experts=8, top_k=2)
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads) == (256, 12, 4)
    assert (small.intermediate_size, small.embedding_size) == (1024, 128)
    assert (base.hidden_size, base.num_attention_heads, base.intermediate_size, base.embedding_size) == (
        768,
        12,
        3072,
        768,
    )
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    large = ElectraMoEConfig.from_preset("large")
    assert (
        large.hidden_size,
        large.num_hidden_layers,
        large.num_attention_heads,
        large.intermediate_size,
    ) == (
        1024,
        24,
        16,
        4096,
    )
    assert [preset_name(c.hidden_size, c.num_hidden_layers) for c in (small, base, large)] == [
        "small",
        "base",
        "large",
    ]
    assert preset_name(300, 12) is None
    gen_small = make_generator_config(small)
    assert (gen_small.hidden_size, gen_small.num_attention_heads, gen_small.intermediate_size) == (64, 1, 256)
    assert gen_small.embedding_size == 128 and gen_small.vocab_size == 30522 and gen_small.num_experts == 1
    gen_base = make_generator_config(base)
    assert (gen_base.hidden_size, gen_base.num_attention_heads, gen_base.intermediate_size) == (256, 4, 1024)
    assert gen_base.num_experts == 1
    gen_moe = make_generator_config(base, generator_moe=True)
    assert gen_moe.num_experts == 8 and gen_moe.expert_intermediate_size == 1024
    with pytest.raises(ValueError, match="model size"):
        ElectraMoEConfig.from_preset("huge")


def test_the_outputs_carry_the_router_fields_named_once():
    from dataclasses import fields

    from modeling_electra import ROUTER_FIELDS, ElectraMoEHeadOutput, ElectraMoEModelOutput

    for output in (ElectraMoEModelOutput, ElectraMoEHeadOutput):
        names = tuple(f.name for f in fields(output))
        assert names[names.index("hidden_states") + 1 :] == ROUTER_FIELDS, output.__name__
