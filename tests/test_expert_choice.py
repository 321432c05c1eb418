"""Expert-choice routing (Zhou et al. 2022): every expert takes its capacity of real tokens, the block equals a
per-expert, per-token reference (fp64, forward and gradients), sequence scope isolates a sequence from its
batch-mates, and an upcycled expert-choice block is the dense FFN on every token some expert takes."""

import math

import pytest
import torch
from transformers import ElectraConfig, ElectraForPreTraining

from modeling_electra import ElectraMoEConfig, ElectraMoEForPreTraining, ElectraMoEModel
from modeling_electra_config import EXPERT_CHOICE_CAPACITY_FACTOR
from moe_dispatch import expert_choice_slots
from moe_reference import reference_routing
from test_modeling import TINY
from upcycling import upcycle_dense_to_moe


def ec_config(**overrides) -> ElectraMoEConfig:
    return ElectraMoEConfig(**{**TINY, "num_experts": 4, "router_type": "expert_choice", **overrides})


def make_block(seed=0, **overrides):
    torch.manual_seed(seed)
    return ElectraMoEModel(ec_config(hidden_dropout_prob=0.0, **overrides)).encoder.layer[0].moe.eval()


def padded_batch(batch_size=3, seq_len=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, seq_len, TINY["hidden_size"], generator=g)
    token_mask = torch.ones(batch_size, seq_len, dtype=torch.bool)
    token_mask[0, 6:] = False
    token_mask[2, 3:] = False
    return hidden, token_mask


def routing_groups(token_mask: torch.Tensor, scope: str) -> list[list[int]]:
    """The flat indices of the real tokens each selection runs over: one list per sequence, or one in all."""
    flat = torch.arange(token_mask.numel()).view_as(token_mask)
    groups = [flat[b][token_mask[b]].tolist() for b in range(token_mask.shape[0])]
    return groups if scope == "sequence" else [sum(groups, [])]


def reference_expert_choice(block, hidden: torch.Tensor, token_mask: torch.Tensor, scope: str):
    """Expert by expert, token by token: expert e takes the min(capacity, n) real tokens of each group with
    the highest score for e; y_t = sum over the experts that took t of gate * expert(x_t)."""
    experts = block.experts
    x = hidden.reshape(-1, hidden.shape[-1])
    probs = reference_routing(block.router, x).probs.to(x.dtype)  # fp64 from the router's weight
    taken: dict[int, list[int]] = {t: [] for t in range(x.shape[0])}
    for group in routing_groups(token_mask, scope):
        capacity = min(math.ceil(block.capacity_factor * len(group) / block.num_experts), len(group))
        for e in range(block.num_experts):
            for t in sorted(group, key=lambda t, e=e: -probs[t, e].item())[:capacity]:
                taken[t].append(e)
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        norm = sum(probs[t, e] for e in taken[t]) if block.norm_topk_prob and taken[t] else 1.0
        for e in taken[t]:
            h = experts.act(x[t] @ experts.weight_in[e] + experts.bias_in[e])
            y = y + probs[t, e] / norm * (h @ experts.weight_out[e] + experts.bias_out[e])
        rows.append(y)
    return block.LayerNorm(torch.stack(rows).view_as(hidden) + hidden), taken


@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("capacity_factor", [1.0, 2.0, 8.0])
def test_every_expert_takes_min_capacity_routable_tokens_and_never_padding(scope, capacity_factor):
    hidden, token_mask = padded_batch()
    block = make_block(capacity_factor=capacity_factor, expert_choice_scope=scope)
    # Padding positions the router would rank first for every expert if it could take them.
    hidden[~token_mask] = 50 * block.router.weight.sum(0).detach()
    x = hidden.reshape(-1, TINY["hidden_size"])
    probs = reference_routing(block.router, x).probs.float()
    group_size = hidden.shape[1] if scope == "sequence" else x.shape[0]
    slots = expert_choice_slots(probs, token_mask.reshape(-1), group_size, capacity_factor, False)
    assert not token_mask.reshape(-1)[slots.token].logical_not().any(), "a padding token was taken"
    assert torch.equal(slots.expert, slots.expert.sort().values), "slots are not sorted by expert"
    for e in range(block.num_experts):
        mine = slots.token[slots.expert == e].tolist()
        assert len(mine) == slots.counts[e] and len(set(mine)) == len(mine)
        for group in routing_groups(token_mask, scope):
            capacity = math.ceil(capacity_factor * len(group) / block.num_experts)
            assert len(set(mine) & set(group)) == min(capacity, len(group))
    with torch.no_grad():
        out, router = block(hidden, token_mask)
    torch.testing.assert_close(out[~token_mask], block.LayerNorm(hidden[~token_mask]))  # residual only
    torch.testing.assert_close(router.expert_load, torch.full((4,), 0.25))


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("norm_topk_prob", [False, True], ids=["raw-scores", "renormalised"])
def test_block_equals_per_token_reference_with_gradients(implementation, scope, norm_topk_prob):
    """fp64 for the loop; grouped_mm has no fp64 kernel, so it is checked in fp32."""
    dtype, tol = (torch.float64, 1e-9) if implementation == "loop" else (torch.float32, 1e-5)
    block = make_block(
        moe_implementation=implementation, expert_choice_scope=scope, norm_topk_prob=norm_topk_prob
    ).to(dtype)
    with torch.no_grad():
        block.experts.bias_in.normal_()
        block.experts.bias_out.normal_()
        block.router.weight.normal_()
    hidden, token_mask = padded_batch(seed=1)
    hidden = hidden.to(dtype)
    results = []
    for run in ("block", "reference"):
        block.zero_grad()
        x = hidden.clone().requires_grad_()
        if run == "block":
            out, router = block(x, token_mask)
        else:
            out, taken = reference_expert_choice(block, x, token_mask, scope)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights)[token_mask].sum().backward()
        grads = {name: p.grad.clone() for name, p in block.named_parameters()}
        results.append((out.detach()[token_mask], x.grad, grads))
    (out, x_grad, grads), (ref_out, ref_x_grad, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=tol, atol=tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=10 * tol, atol=tol, msg=name)
    assert grads["router.weight"].abs().sum() > 0
    # Statistics: the fraction of real tokens taken by 0, 1, 2, ... experts; no load-balancing loss.
    real = token_mask.reshape(-1).nonzero().flatten().tolist()
    counts = torch.bincount(torch.tensor([len(taken[t]) for t in real]), minlength=5).double()
    torch.testing.assert_close(router.experts_per_token.double(), counts / len(real))
    assert router.dropped_fraction.item() == pytest.approx(counts[0].item() / len(real))
    assert router.aux_loss.item() == 0.0 and router.z_loss.item() > 0


@pytest.mark.parametrize("scope, isolated", [("sequence", True), ("batch", False)])
def test_sequence_scope_makes_a_sequence_independent_of_its_batch_mates(scope, isolated):
    torch.manual_seed(0)
    model = ElectraMoEForPreTraining(ec_config(expert_choice_scope=scope, capacity_factor=1.0)).eval()
    with torch.no_grad():  # experts and routers large enough that who takes a token shows in the logits
        for name, param in model.named_parameters():
            if ".moe.experts." in name or ".moe.router." in name:
                param.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, TINY["vocab_size"], (4, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    with torch.no_grad():
        together = model(input_ids, attention_mask=attention_mask).logits
        # Sequence 0 with other batch-mates: its neighbours permuted, replaced by fresh text, or absent.
        others = torch.randint(5, TINY["vocab_size"], (3, 12), generator=g)
        variants = [
            (input_ids[[0, 3, 1, 2]], attention_mask[[0, 3, 1, 2]]),
            (torch.cat([input_ids[:1], others]), torch.ones(4, 12, dtype=torch.long)),
            (input_ids[:1], attention_mask[:1]),
        ]
        differences = [
            (model(ids, attention_mask=mask).logits[0] - together[0]).abs().max().item()
            for ids, mask in variants
        ]
    if isolated:
        assert max(differences) < 1e-5, differences
    else:  # Zhou et al.'s caveat: with batch-wide selection a sequence's predictions depend on the batch
        assert max(differences) > 1e-3, differences


def test_config_defaults_and_validation():
    config = ec_config()
    assert config.capacity_factor == EXPERT_CHOICE_CAPACITY_FACTOR == 2.0
    assert config.expert_choice_scope == "sequence" and config.norm_topk_prob is False
    assert ec_config(capacity_factor=1.25).capacity_factor == 1.25
    assert ElectraMoEConfig(**TINY, num_experts=4).capacity_factor is None  # token choice stays dropless
    with pytest.raises(ValueError, match="expert_choice_scope"):
        ec_config(expert_choice_scope="document")
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="capacity_factor"):
            ec_config(capacity_factor=bad)
    # top_k is ignored: the same model whatever it says.
    hidden, token_mask = padded_batch()
    with torch.no_grad():
        outs = [make_block(top_k=k)(hidden, token_mask)[0] for k in (1, 3)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def untaken_fraction(block, hidden: torch.Tensor, token_mask: torch.Tensor) -> float:
    """The share of real tokens that no expert takes (they keep only the residual path)."""
    with torch.no_grad():
        return block(hidden, token_mask)[1].experts_per_token[0].item()


def test_upcycled_block_equals_dense_ffn_on_every_taken_token():
    torch.manual_seed(0)
    dense = ElectraForPreTraining(ElectraConfig(**TINY)).eval()
    config = ec_config(num_experts=8, norm_topk_prob=True)
    upcycled = upcycle_dense_to_moe(dense, config).eval()
    hidden, token_mask = padded_batch(batch_size=4, seq_len=16, seed=2)
    layer = dense.electra.encoder.layer[0]
    block = upcycled.electra.encoder.layer[0].moe
    with torch.no_grad():
        expected = layer.output(layer.intermediate(hidden), hidden)
        out, _ = block(hidden, token_mask)
        x = hidden.reshape(-1, TINY["hidden_size"])
        probs = reference_routing(block.router, x).probs.float()
        slots = expert_choice_slots(probs, token_mask.reshape(-1), 16, 2.0, True)
    taken = torch.zeros(x.shape[0], dtype=torch.bool)
    taken[slots.token] = True
    taken = taken.view_as(token_mask)
    assert taken.sum() > 0.5 * token_mask.sum()
    torch.testing.assert_close(out[taken], expected[taken], rtol=1e-5, atol=1e-5)
    untaken = (token_mask & ~taken).sum().item() / token_mask.sum().item()
    assert untaken_fraction(block, hidden, token_mask) == pytest.approx(untaken)
    if untaken:  # tokens no expert took keep only the residual path, so they differ from the dense FFN
        assert not torch.allclose(out[token_mask & ~taken], expected[token_mask & ~taken], atol=1e-3)
    print(f"\nupcycled expert choice (8 experts, capacity factor 2) at init: {untaken:.1%} of tokens untaken")


@pytest.mark.parametrize("router_type", ["expert_choice", "softmax_topk"])
def test_models_report_how_many_experts_took_each_token(router_type):
    torch.manual_seed(0)
    config = ec_config(router_type=router_type, top_k=2, capacity_factor=None)
    model = ElectraMoEForPreTraining(config).eval()
    input_ids = torch.randint(5, TINY["vocab_size"], (3, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask)
    assert out.experts_per_token.shape == (TINY["num_hidden_layers"], 4 + 1)
    torch.testing.assert_close(out.experts_per_token.sum(-1), torch.ones(TINY["num_hidden_layers"]))
    if router_type == "softmax_topk":  # dropless top-2: every real token has exactly two experts
        assert (out.experts_per_token[:, 2] == 1).all() and out.aux_loss > 0
    else:  # per expert ceil(2 x 5 / 4) = 3 of the 5 real tokens of sequence 0, 4 of 8 of the others
        mean_experts = (out.experts_per_token * torch.arange(5)).sum(-1)
        torch.testing.assert_close(mean_experts, torch.full((2,), (4 * 3 + 2 * 4 * 4) / 21))
        assert out.aux_loss.item() == 0.0 and out.z_loss > 0
