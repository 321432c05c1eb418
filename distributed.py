"""Scaling the pretrainer past one GPU's memory: FSDP2 sharding, its checkpoints, activation checkpointing
and `torch.compile` (the `scaling` flags of wikitext_trainer.py).

Sharding uses torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) directly, not accelerate's FSDP plugin:
accelerate 1.15 turns the plugin on only for multi-GPU runs (its MULTI_CPU state ignores it), so the
plugin's path could not be tested on CPU, and the trainer already owns the loop. Each encoder layer of the
generator and of the discriminator is one FSDP unit (its attention and stacked expert weights gathered
together, freed after its forward, gathered again for its backward); the root unit holds the rest:
the embeddings, which the generator and discriminator share and the generator's LM head is tied to (a
parameter can belong to one unit only, and they are a small part of an MoE model), and the heads.

The hand-written expert backward (`moe_dispatch.ExpertLoopFunction`) needs no change: FSDP2 runs a unit's
forward and backward on its gathered (unsharded) parameters, so the function sees ordinary tensors; FSDP
reduce-scatters the gradients it writes (tests/test_fsdp.py compares them with one process's).

Checkpoints: `torch.distributed.checkpoint` writes each process's shards of the model and AdamW state
into the checkpoint folder (`.metadata`, `__<rank>_0.distcp`) through accelerate's save/load hooks, so
run_state's temp-folder-and-rename, manifest, stop signals and corrupt-checkpoint fallback are unchanged.
The final `generator/` and `discriminator/` are gathered to process 0 and saved as ordinary models.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

SHARDING_MODES = ("ddp", "fsdp")


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    """The `scaling` flags: --sharding, --gradient_checkpointing, --compile."""
    scaling = parser.add_argument_group("scaling (docs/pretraining.md, 'Models larger than one GPU')")
    scaling.add_argument(
        "--sharding",
        choices=SHARDING_MODES,
        default="ddp",
        help="with several processes: ddp keeps a full copy of weights, gradients and AdamW state on each; "
        "fsdp shards them (FSDP2, one unit per encoder layer)",
    )
    scaling.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each encoder layer's activations in the backward pass instead of keeping them",
    )
    scaling.add_argument(
        "--compile", action="store_true", help="torch.compile each encoder layer's forward (inductor)"
    )


def scaling_flags_error(args: argparse.Namespace) -> str | None:
    """Why the scaling flags cannot run as given (for parser.error), or None."""
    if args.sharding != "fsdp":
        return None
    if args.mixed_precision == "fp16":
        return (
            "--sharding fsdp takes --mixed_precision bf16 or no (fp16 would need a sharded gradient scaler)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return "--sharding fsdp needs 2 or more processes (torchrun or accelerate launch); one process trains unsharded"
    return None


# --- Building the model ---------------------------------------------------------------------------------------


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every encoder layer of the generator and the discriminator of an ElectraPretrainingModel."""
    return [*model.generator.electra.encoder.layer, *model.discriminator.electra.encoder.layer]


def prepare_layers(
    model: nn.Module, gradient_checkpointing: bool, compile_layers: bool, compile_backend: str = "inductor"
) -> None:
    """Activation checkpointing per encoder layer (non-reentrant) and/or each layer's forward compiled.

    Compiling the bound `forward` (not wrapping the module) keeps parameter names, so checkpoints and the
    saved models are the same with and without --compile, and FSDP's hooks stay outside the compiled code.
    """
    if gradient_checkpointing:
        for part in (model.generator, model.discriminator):
            part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers:
        for layer in encoder_layers(model):
            layer.forward = torch.compile(layer.forward, backend=compile_backend)


def prepare_model(model: nn.Module, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The scaling flags applied to the ElectraPretrainingModel: checkpointing, compile, then FSDP units
    (before the optimizer is built: it must take the sharded parameters)."""
    prepare_layers(model, args.gradient_checkpointing, args.compile)
    if args.sharding == "fsdp":
        model = shard_model(model, device, args.mixed_precision)
    return model


def prepare_training(accelerator: Any, model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
    """DDP (and mixed precision) through `accelerator.prepare`; a sharded model as it is, with its sharded
    checkpoints hooked into `accelerator.save_state` / `load_state`."""
    if not is_sharded(model):
        return accelerator.prepare(model, optimizer)
    register_sharded_checkpointing(accelerator, model, optimizer)
    return model, optimizer


def mixed_precision_policy(mixed_precision: str) -> Any:
    """FSDP's policy: bf16 compute and gathers over fp32 master weights, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """FSDP2 over all processes: one unit per encoder layer, the root unit for embeddings and heads.

    Call before building the optimizer (its parameters become the sharded DTensors).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(mixed_precision)
    for layer in encoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(accelerator: Any, model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm` in total; returns the norm before clipping. Sharded (DTensor)
    gradients: the norm over all shards, the same on every process; otherwise accelerate's clipping."""
    parameters = list(model.parameters())
    if not is_sharded(model):
        return accelerator.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds for parameters and optimizer state (its shards under FSDP)."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    tensors = [local(p) for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}  # tied weights counted once
    return sum(unique.values())


# --- Evaluation in lockstep -----------------------------------------------------------------------------------


def evaluation_batches(
    num_examples: int, batch_size: int, accelerator: Any, model: nn.Module
) -> list[tuple[np.ndarray, bool]]:
    """This process's evaluation batches (every num_processes-th example) as `(indices, counted)`.

    Under FSDP every forward gathers parameters collectively, so every process must run as many forwards
    as the process with the most examples: the ones with fewer repeat a batch whose outputs are not counted.
    """
    shard = np.arange(accelerator.process_index, num_examples, accelerator.num_processes)
    batches = [(shard[start : start + batch_size], True) for start in range(0, len(shard), batch_size)]
    if not is_sharded(model):
        return batches
    most = math.ceil(math.ceil(num_examples / accelerator.num_processes) / batch_size)
    filler = batches[-1][0] if batches else np.arange(min(num_examples, 1))
    return batches + [(filler, False)] * (most - len(batches))


# --- Checkpoints ----------------------------------------------------------------------------------------------


def register_sharded_checkpointing(accelerator: Any, model: nn.Module, optimizer: Any) -> None:
    """Make `accelerator.save_state` / `load_state` write and read the sharded model and AdamW state with
    `torch.distributed.checkpoint` (every process its own shards) into the checkpoint folder itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_state_dict,
        set_state_dict,
    )

    def save(_models: list, _weights: list, output_dir: str) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=output_dir)

    def load(_models: list, input_dir: str) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=input_dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# --- Final models ---------------------------------------------------------------------------------------------


@dataclass
class FinalModels:
    """The generator and discriminator as ordinary (unsharded) transformers models, ready to save."""

    generator: nn.Module
    discriminator: nn.Module


def final_models(model: nn.Module, accelerator: Any) -> FinalModels | None:
    """The two models to save: unwrapped as they are, or, under FSDP, gathered into fresh copies on the main
    process (a collective: every process must call it; the others get None)."""
    if not is_sharded(model):
        module = accelerator.unwrap_model(model)
        return FinalModels(module.generator, module.discriminator)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    if not accelerator.is_main_process:
        return None
    from transformers.initialization import no_init_weights

    parts = {}
    for name in ("generator", "discriminator"):
        sharded_part = getattr(model, name)
        with (
            no_init_weights()
        ):  # every weight is loaded next (a random init of 13 B parameters takes minutes)
            part = type(sharded_part)(sharded_part.config)
        prefix = f"{name}."
        part.load_state_dict({k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)})
        part.tie_weights()  # the generator's LM head is its word embeddings (no_init_weights skipped the tie)
        parts[name] = part
    return FinalModels(**parts)
