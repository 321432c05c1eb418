"""--gradient_checkpointing and --compile on one process: the same losses and gradients as without them.

The compile test uses the `aot_eager` backend: the same Dynamo capture, graph breaks and AOT-autograd graphs
as --compile's inductor, without inductor's C++ code generation, which took 276 s for this tiny model on
the 2 shared CPU cores (it passed at the same tolerance; bench/gpu_check.sh runs inductor on the GPU).
"""

import torch

from distributed import prepare_layers
from fsdp_worker import build

# Recomputation replays the same operations with the same RNG state (dropout, noisy routing): equal up to
# summation order, measured 0 on CPU; the bound.
CHECKPOINTING_TOLERANCE = 1e-6
# Compiled graphs may reorder fp32 arithmetic (inductor fuses kernels): 1e-4 relative, 1e-6 absolute.
COMPILE_REL_TOLERANCE = 1e-4


def loss_and_grads(vocab_dir, dropout: bool, **layers: object) -> tuple[torch.Tensor, dict, int]:
    """Loss and gradients of one batch, and how often the discriminator's first layer's forward ran."""
    model = build(str(vocab_dir), dropout=dropout)
    prepare_layers(model, **layers)
    model.train()
    calls = []
    model.discriminator.electra.encoder.layer[0].moe.register_forward_pre_hook(lambda *_: calls.append(1))
    input_ids = torch.randint(5, 100, (4, 32), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1)
    loss = model(input_ids)["loss"]
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


def assert_close(a, b, rtol, atol):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and any("experts.weight_in" in name for name in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(vocab_dir):
    plain = loss_and_grads(vocab_dir, True, gradient_checkpointing=False, compile_layers=False)
    checkpointed = loss_and_grads(vocab_dir, True, gradient_checkpointing=True, compile_layers=False)
    assert (plain[2], checkpointed[2]) == (1, 2)  # the layer ran again in the backward pass
    assert_close(checkpointed, plain, rtol=CHECKPOINTING_TOLERANCE, atol=CHECKPOINTING_TOLERANCE)


def test_compile_gives_the_same_loss_and_gradients(vocab_dir):
    from torch._dynamo.utils import counters

    counters.clear()
    plain = loss_and_grads(vocab_dir, False, gradient_checkpointing=False, compile_layers=False)
    assert not counters["stats"]["unique_graphs"]
    compiled = loss_and_grads(vocab_dir, False, gradient_checkpointing=False, compile_layers=True,
                              compile_backend="aot_eager")  # fmt: skip
    assert counters["stats"]["unique_graphs"] > 0  # Dynamo captured graphs of the layers
    assert_close(compiled, plain, rtol=COMPILE_REL_TOLERANCE, atol=1e-6)
