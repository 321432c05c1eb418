"""MoE dispatch internals: the grouped_mm (CUDA, bf16) path exercised on CPU, the CPU loop's gradients
checked by finite differences, and allocation bounds (nothing proportional to experts x tokens x hidden).

test_modeling.py already checks both paths against a per-token reference (outputs, capacity, empty experts)
and against each other (gradients in fp32); these tests cover what it does not.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bench.bench_moe import Shape, build_methods, clear_grads, cpu_allocation_stats, forward_backward
from modeling_electra import ElectraMoEConfig, ElectraMoEModel
from moe_dispatch import KEEP_GRAPH_BINDING, backward_may_free_saved_tensors, fused_grouped_mm_available

TINY = dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)


def make_block(seed=0, **overrides):
    torch.manual_seed(seed)
    config = ElectraMoEConfig(
        **{**TINY, "num_experts": 4, "top_k": 2, "hidden_dropout_prob": 0.0, **overrides}
    )
    return ElectraMoEModel(config).encoder.layer[0].moe


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Record the operand dtypes of every `F.grouped_mm` call while still running it."""
    calls = []
    real = F.grouped_mm

    def spy(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


def test_auto_takes_the_loop_on_cpu_and_grouped_mm_when_forced(grouped_mm_calls):
    hidden = torch.randn(2, 5, TINY["hidden_size"])
    make_block(moe_implementation="auto")(hidden)
    assert grouped_mm_calls == []
    make_block(moe_implementation="grouped_mm")(hidden)
    assert len(grouped_mm_calls) == 2


def test_grouped_mm_path_runs_in_the_autocast_dtype(grouped_mm_calls):
    """The GPU path under bf16 autocast: grouped_mm is not autocast-aware, so the block must cast itself."""
    hidden = torch.randn(3, 7, TINY["hidden_size"])
    outputs, grads = {}, {}
    for implementation in ("loop", "grouped_mm"):
        block = make_block(seed=1, moe_implementation=implementation).train()
        x = hidden.clone().requires_grad_(True)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out, router = block(x)
        (out.float().square().mean() + router.aux_loss).backward()
        outputs[implementation] = out.float().detach()
        grads[implementation] = block.experts.weight_in.grad
        assert block.experts.weight_in.grad.dtype == torch.float32
        per_expert = block.experts.weight_in.grad.flatten(1).abs().sum(1)
        assert torch.isfinite(x.grad).all() and (per_expert > 0).all()
    assert grouped_mm_calls == [(torch.bfloat16, torch.bfloat16)] * 2
    torch.testing.assert_close(outputs["grouped_mm"], outputs["loop"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads["grouped_mm"], grads["loop"], rtol=5e-2, atol=1e-3)
    with torch.no_grad():
        fp32 = make_block(seed=1, moe_implementation="grouped_mm")(hidden)[0]
    torch.testing.assert_close(outputs["grouped_mm"], fp32, rtol=5e-2, atol=5e-2)


def assert_loop_gradients_pass_gradcheck(**overrides):
    """float64 finite differences through sort, gather, the hand-written per-expert backward (closed-form GELU
    derivatives, autograd for other activations), gates and scatter-add."""
    block = make_block(moe_implementation="loop", **overrides).double().eval()
    names = [
        "router.weight",
        "experts.weight_in",
        "experts.bias_in",
        "experts.weight_out",
        "experts.bias_out",
    ]
    params = dict(block.named_parameters())
    with torch.no_grad():
        params["experts.bias_in"].normal_()
        params["experts.bias_out"].normal_()
        params["router.weight"].normal_()
    tokens = 3 if overrides.get("num_experts") == 8 else 10
    x = torch.randn(1, tokens, TINY["hidden_size"], dtype=torch.float64)
    if overrides.get("num_experts") == 8:
        assert (block(x)[1].expert_load == 0).sum() >= 5

    def run(x, *tensors):
        out, router = functional_call(block, {**params, **dict(zip(names, tensors, strict=True))}, (x,))
        return out, router.aux_loss

    inputs = [x.requires_grad_()] + [params[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts=4, top_k=2),
        dict(num_experts=4, top_k=2, hidden_act="silu", norm_topk_prob=True),
        dict(num_experts=4, top_k=1, hidden_act="gelu_pytorch_tanh"),
        dict(num_experts=4, top_k=2, capacity_factor=0.5),
        dict(num_experts=8, top_k=1),
    ],
    ids=["gelu", "silu", "gelu-tanh", "capacity", "empty-experts"],
)
def test_loop_backward_passes_gradcheck(overrides):
    assert_loop_gradients_pass_gradcheck(**overrides)


def test_pinned_torch_has_the_keep_graph_binding():
    """The expert loop frees activations during backward only through this private binding; without it
    training still works (next test) but holds every expert's activations until the backward ends."""
    binding = getattr(torch._C._autograd, KEEP_GRAPH_BINDING, None)
    assert callable(binding), (
        f"torch {torch.__version__} no longer has torch._C._autograd.{KEEP_GRAPH_BINDING}: "
        "moe_dispatch.backward_may_free_saved_tensors now always keeps activations (more memory); "
        "find the new way to ask whether the graph is retained, or pin the previous torch"
    )


@pytest.mark.parametrize(
    "overrides", [dict(hidden_act="gelu"), dict(hidden_act="silu")], ids=["gelu", "silu"]
)
def test_loop_gradients_are_correct_without_the_binding(monkeypatch, overrides):
    """The fallback when torch drops the binding: never free saved tensors, same gradients."""
    monkeypatch.delattr(torch._C._autograd, KEEP_GRAPH_BINDING)
    assert_loop_gradients_pass_gradcheck(num_experts=4, top_k=2, **overrides)
    block = make_block(moe_implementation="loop", **overrides)
    x = torch.randn(2, 6, TINY["hidden_size"], requires_grad=True)
    out, _ = block(x)
    out.sum().backward()
    grads = x.grad.clone(), block.experts.weight_in.grad.clone()
    monkeypatch.undo()
    x.grad = None
    block.zero_grad()
    block(x)[0].sum().backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], block.experts.weight_in.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "capability, dtype, fused",
    [
        ((9, 0), torch.bfloat16, True),
        ((10, 0), torch.bfloat16, True),
        ((8, 0), torch.bfloat16, False),
        ((7, 0), torch.bfloat16, False),
        ((9, 0), torch.float16, False),
        ((9, 0), torch.float32, False),
    ],
    ids=["H100-bf16", "B200-bf16", "A100-bf16", "V100-bf16", "H100-fp16", "H100-fp32"],
)
def test_auto_takes_grouped_mm_only_where_torch_has_a_fused_kernel(monkeypatch, capability, dtype, fused):
    """Elsewhere torch's grouped_mm is a serial loop of mm with a host sync per group: auto takes the loop."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_grouped_mm_available(cuda, dtype) is fused
    assert make_block(moe_implementation="auto").use_grouped_mm(cuda, dtype) is fused
    assert not make_block(moe_implementation="auto").use_grouped_mm(cpu, torch.bfloat16)
    assert not make_block(moe_implementation="auto", expert_intermediate_size=6).use_grouped_mm(cuda, dtype)
    assert make_block(moe_implementation="grouped_mm").use_grouped_mm(cuda, dtype)
    assert not make_block(moe_implementation="loop").use_grouped_mm(cuda, dtype)


def test_loop_backward_twice_with_retain_graph():
    block = make_block(moe_implementation="loop")
    x = torch.randn(2, 6, TINY["hidden_size"], requires_grad=True)
    out, _ = block(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward(retain_graph=True)
    once = x.grad.clone(), block.experts.weight_out.grad.clone()
    (out * weights).sum().backward()
    torch.testing.assert_close(x.grad, 2 * once[0])
    torch.testing.assert_close(block.experts.weight_out.grad, 2 * once[1])


def test_backward_knows_whether_the_graph_is_retained():
    """The expert loop frees its activations during backward only when autograd will not run it again."""
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(backward_may_free_saved_tensors())
            return grad

    x = torch.randn(3, requires_grad=True)
    y = Probe.apply(x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert seen == [False, True]
    assert not backward_may_free_saved_tensors()


def test_loop_backward_after_the_graph_was_freed_raises():
    block = make_block(moe_implementation="loop")
    out, _ = block(torch.randn(2, 6, TINY["hidden_size"], requires_grad=True))
    out.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        out.sum().backward()


# Moderate shape where E x T x H dwarfs every legitimate buffer: 32 experts, 1,024 tokens, hidden 64.
ALLOC_HIDDEN, ALLOC_EXPERT, ALLOC_TOKENS, ALLOC_TOP_K = 64, 128, 1024, 2
FEW_EXPERTS, MANY_EXPERTS = 8, 32
# The ELECTRA FFN's peak should be matched within this factor (issue target), activations only.
PEAK_RATIO_LIMIT = 1.3


def step_allocations(shape: Shape, num_experts: int, top_k: int, method: str):
    """Allocation stats of one training step of a benchmark layer (after a warm-up step), and its parameter
    bytes; the peak includes parameter gradients, as bench_moe measures it."""
    torch.manual_seed(0)
    module = build_methods(shape, num_experts, top_k, (method,), dtype_bytes=4)[0][method].train()
    x = torch.randn(shape.batch, shape.seq_len, shape.hidden, requires_grad=True)
    grad_out = torch.randn_like(x)
    forward_backward(module, x, grad_out, torch.float32)
    clear_grads(module, x)
    stats = cpu_allocation_stats(lambda: forward_backward(module, x, grad_out, torch.float32))
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return stats, param_bytes


def allocations(method: str, num_experts: int):
    shape = Shape("alloc", ALLOC_HIDDEN, ALLOC_EXPERT, ALLOC_TOKENS // 64, 64, (num_experts,), (ALLOC_TOP_K,))
    return step_allocations(shape, num_experts, ALLOC_TOP_K, method)


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
def test_no_allocation_proportional_to_experts_times_tokens_times_hidden(implementation):
    """Allocations are deterministic, so these bounds hold on a busy machine.

    Going from 8 to 32 experts may add parameter gradients (autograd builds them per expert, then stacks
    them), but not a [E, T, H] dispatch tensor, a per-expert [T, H] gradient (`x[mask]` backward) or a
    per-expert full-size weight gradient (`w[e]`): with the benchmark's baselines the last two add 21 and
    69 MB here against a bound of 6 MB, the current loop 4.2 MB.
    """
    few, few_params = allocations(implementation, FEW_EXPERTS)
    many, many_params = allocations(implementation, MANY_EXPERTS)
    dense, dense_params = allocations("dense", MANY_EXPERTS)
    token_expert_hidden = (MANY_EXPERTS - FEW_EXPERTS) * ALLOC_TOKENS * ALLOC_HIDDEN * 4
    assert many.total - few.total <= 3 * (many_params - few_params) + token_expert_hidden / 4
    one_weight_stack = MANY_EXPERTS * ALLOC_HIDDEN * ALLOC_EXPERT * 4
    one_activation = ALLOC_TOKENS * ALLOC_TOP_K * ALLOC_EXPERT * 4
    assert many.largest <= max(one_weight_stack, one_activation)
    assert many.peak - many_params <= PEAK_RATIO_LIMIT * (dense.peak - dense_params)


def test_peak_memory_at_base_proportions_stays_within_the_target():
    """Base shapes with 16 experts top-1 (8,192 tokens, hidden 768, experts of 3,072) scaled down 8x in
    tokens and widths: each expert's weights outweigh its activations, so a backward that holds every
    expert's weight gradient and then stacks them (autograd's loop: 1.37x) misses the 1.3x target."""
    shape = Shape("base/8", 96, 384, 2, 512, (16,), (1,))
    peaks = {method: step_allocations(shape, 16, 1, method)[0].peak for method in ("dense", "loop")}
    assert peaks["loop"] <= PEAK_RATIO_LIMIT * peaks["dense"]


def test_grouped_mm_needs_aligned_sizes():
    with pytest.raises(ValueError, match="multiples of 8"):
        make_block(moe_implementation="grouped_mm", expert_intermediate_size=6)
    assert not make_block(moe_implementation="auto", expert_intermediate_size=6).grouped_mm_aligned
