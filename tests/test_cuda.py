"""The CUDA path: grouped_mm dispatch in bf16, a full RTD step under bf16 autocast, the auto-dispatch
decision and host syncs inside the MoE block. Every test is marked `cuda` and skipped without a GPU;
`bench/gpu_check.sh` runs them with `pytest -m cuda` on a lent GPU (docs/gpu.md).

Tolerances: the two dispatch paths run the same bf16 matrix products in a different order, so their
outputs and gradients agree to bf16 rounding, not bit for bit. Errors are relative norms
(||a - b|| / ||b||); bf16 operands land between 1e-3 and 1e-2, so 2e-2 passes rounding and fails any
wrong index, gate or missing expert (those give errors of order 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_electra import ElectraMoEBlock, ElectraMoEForMaskedLM, ElectraMoEForPreTraining
from modeling_electra_config import ElectraMoEConfig, make_generator_config
from moe_dispatch import fused_grouped_mm_available

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by bench/gpu_check.sh)"),
]

BF16_REL_TOL = 2e-2
HIDDEN, EXPERT = 256, 1024  # ELECTRA-Small's FFN shape
BATCH, SEQ = 8, 128
EXPERT_GRID = [(1, 1), (8, 1), (8, 2), (64, 1), (64, 2)]  # E=1 clips top_k to 1
# Token choice with and without padding and a capacity limit; expert choice (capacity factor 2, top_k
# ignored) with padding.
CASES = [(e, k, v) for e, k in EXPERT_GRID for v in ("dropless", "padding", "capacity")]
CASES += [(8, 1, "expert_choice"), (64, 1, "expert_choice")]
MASK_ID, VOCAB = 103, 30522
RTD_DISC_WEIGHT = 50.0  # ELECTRA's discriminator loss weight


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def make_block(experts: int, top_k: int, variant: str, implementation: str) -> ElectraMoEBlock:
    routing = {"capacity": dict(capacity_factor=1.0), "expert_choice": dict(router_type="expert_choice")}
    config = ElectraMoEConfig(
        hidden_size=HIDDEN, intermediate_size=EXPERT, num_attention_heads=4, num_experts=experts, top_k=top_k,
        moe_implementation=implementation, hidden_dropout_prob=0.0, **routing.get(variant, {}),
    )  # fmt: skip
    return ElectraMoEBlock(config)


def init_block(block: nn.Module, seed: int = 0) -> None:
    """Weights of unit-scale activations, so the experts' output is not hidden by the residual."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in block.named_parameters():
        if "LayerNorm" in name:
            continue
        fan_in = param.shape[-2] if param.dim() == 3 else param.shape[-1]
        scale = 0.1 if "bias" in name else fan_in**-0.5
        param.data.copy_(torch.randn(param.shape, generator=generator) * scale)


def token_mask(variant: str, device: torch.device) -> torch.Tensor | None:
    if variant not in ("padding", "expert_choice"):
        return None
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool, device=device)
    mask[::2, SEQ * 3 // 4 :] = False  # every other sequence padded over its last quarter
    return mask


def forward_backward(block, hidden, mask, grad_out, autocast: bool):
    """Output, input gradient and parameter gradients of one forward/backward (router losses included)."""
    block.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out, router = block(x, mask)
        loss = (out.float() * grad_out).sum() + router.aux_loss + router.z_loss
    loss.backward()
    grads = {name: p.grad for name, p in block.named_parameters() if p.grad is not None}
    return out.float().detach(), x.grad, grads


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    calls = []
    real = F.grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


@pytest.mark.parametrize(("experts", "top_k", "variant"), CASES)
def test_grouped_mm_equals_loop_in_bf16_forward_and_backward(experts, top_k, variant, grouped_mm_calls):
    device = torch.device("cuda")
    torch.manual_seed(experts * 10 + top_k)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, device=device)
    grad_out = torch.randn(BATCH, SEQ, HIDDEN, device=device)
    mask = token_mask(variant, device)
    blocks = {impl: make_block(experts, top_k, variant, impl) for impl in ("loop", "grouped_mm")}
    init_block(blocks["loop"])
    blocks["grouped_mm"].load_state_dict(blocks["loop"].state_dict())
    reference = forward_backward(blocks["loop"].to(device), hidden, mask, grad_out, autocast=False)
    loop = forward_backward(blocks["loop"], hidden, mask, grad_out, autocast=True)
    grouped = forward_backward(blocks["grouped_mm"].to(device), hidden, mask, grad_out, autocast=True)
    assert grouped_mm_calls and set(grouped_mm_calls) == {torch.bfloat16}

    for name, (a, b, ref) in {"output": (grouped[0], loop[0], reference[0]),
                              "input grad": (grouped[1], loop[1], reference[1])}.items():  # fmt: skip
        assert rel_err(a, b) < BF16_REL_TOL, f"{name}: grouped_mm vs loop"
        assert rel_err(a, ref) < BF16_REL_TOL, f"{name}: grouped_mm vs fp32"
    assert grouped[2].keys() == loop[2].keys() == reference[2].keys()
    for name, grad in reference[2].items():
        assert rel_err(grouped[2][name], loop[2][name]) < BF16_REL_TOL, f"grad {name}: grouped_mm vs loop"
        assert rel_err(grouped[2][name], grad) < BF16_REL_TOL, f"grad {name}: grouped_mm vs fp32"


def test_auto_dispatch_on_this_gpu(grouped_mm_calls, capsys):
    """`auto` takes grouped_mm in bf16 for aligned sizes where torch has a fused kernel (compute capability
    9.x/10.x: H100, H200, B200), and the loop in fp32, for unaligned sizes and on other GPUs."""
    device = torch.device("cuda")
    name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    hidden = torch.randn(4, 64, HIDDEN, device=device)
    aligned = make_block(8, 2, "dropless", "auto")
    init_block(aligned)
    unaligned = ElectraMoEBlock(
        ElectraMoEConfig(hidden_size=HIDDEN, intermediate_size=1020, num_attention_heads=4, num_experts=8)
    )
    init_block(unaligned)
    calls = {}
    for label, block, autocast in (("aligned bf16", aligned, True), ("aligned fp32", aligned, False),
                                   ("unaligned bf16", unaligned, True)):  # fmt: skip
        before = len(grouped_mm_calls)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            block.to(device)(hidden)
        calls[label] = "grouped_mm" if len(grouped_mm_calls) > before else "loop"
    with capsys.disabled():
        print(f"\nauto dispatch on {name} (sm_{capability[0]}{capability[1]}): {calls}")
    fused = capability[0] in (9, 10)
    assert fused == fused_grouped_mm_available(device, torch.bfloat16)
    assert calls == {"aligned bf16": "grouped_mm" if fused else "loop", "aligned fp32": "loop",
                     "unaligned bf16": "loop"}  # fmt: skip


@pytest.mark.parametrize(("experts", "top_k"), [(1, 1), (8, 2)])
def test_rtd_pretraining_step_under_bf16_autocast(experts, top_k, grouped_mm_calls):
    """Generator MLM + Gumbel sampling + discriminator RTD loss, backward and AdamW, as the trainer does."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    disc_config = ElectraMoEConfig.from_preset("small", vocab_size=VOCAB, num_experts=experts, top_k=top_k)
    discriminator = ElectraMoEForPreTraining(disc_config).to(device)
    generator = ElectraMoEForMaskedLM(make_generator_config(disc_config)).to(device)
    params = list({id(p): p for p in [*discriminator.parameters(), *generator.parameters()]}.values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    input_ids = torch.randint(1000, VOCAB, (32, 128), device=device)
    attention_mask = torch.ones_like(input_ids)

    def rtd_loss(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        masked = torch.rand(input_ids.shape, device=device, generator=torch.Generator(device).manual_seed(1))
        masked = masked < 0.15
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            gen = generator(input_ids.masked_fill(masked, MASK_ID), attention_mask,
                            labels=input_ids.masked_fill(~masked, -100))  # fmt: skip
            gumbel = -torch.log(-torch.log(torch.rand_like(gen.logits, dtype=torch.float32).clamp(1e-9, 1)))
            sampled = (gen.logits.detach().float() + gumbel).argmax(-1)
            corrupted = torch.where(masked, sampled, input_ids)
            disc = discriminator(corrupted, attention_mask, labels=(corrupted != input_ids).long())
        return gen.loss, disc.loss

    with torch.no_grad():
        fp32_losses = rtd_loss(autocast=False)
    gen_loss, disc_loss = rtd_loss(autocast=True)
    (gen_loss + RTD_DISC_WEIGHT * disc_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True) if p.grad is not None)
    for bf16, fp32 in zip((gen_loss, disc_loss), fp32_losses, strict=True):
        assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.05 * abs(fp32.item()) + 0.05
    if experts > 1:
        assert grouped_mm_calls and set(grouped_mm_calls) == {torch.bfloat16}


def test_grouped_moe_block_forward_backward_has_no_host_sync():
    """The dropless block without padding never waits on the GPU.

    Padding (`token_mask`) and a capacity limit compact the routed slots with boolean masks, whose output
    size depends on the data: each such compaction is one device-to-host sync by construction (docs/gpu.md).
    """
    device = torch.device("cuda")
    block = make_block(8, 2, "dropless", "grouped_mm")
    init_block(block)
    block = block.to(device)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, device=device, requires_grad=True)
    forward_backward(block, hidden, None, torch.ones_like(hidden), autocast=True)  # warm-up: lazy inits
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, router = block(hidden)
            loss = out.float().sum() + router.aux_loss + router.z_loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
