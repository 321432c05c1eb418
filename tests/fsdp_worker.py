"""Run by tests/test_fsdp.py under torchrun (2 gloo processes).

fsdp_worker.py grads OUT.json VOCAB_DIR  -- one batch through an FSDP-sharded model and an unsharded copy:
    the largest gradient difference per parameter (full tensors), then one AdamW step each and the bytes
    of parameters + AdamW state this process holds under FSDP and unsharded (DDP keeps a full copy).
fsdp_worker.py stop STEP TRAINER_ARGS...  -- wikitext_trainer.main with a real SIGTERM sent to process 0
    right after it logs step STEP (the stop signal reaches the other process through the trainer).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_state  # noqa: E402
import wikitext_trainer as wt  # noqa: E402
from distributed import local_state_bytes, shard_model  # noqa: E402

MODEL_FLAGS = [
    "--model_size", "tiny", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
    "--intermediate_size", "64", "--embedding_size", "32", "--num_experts", "8", "--top_k", "2",
    "--moe_implementation", "loop", "--generator_moe",
]  # fmt: skip


def build(vocab_dir: str, dropout: bool = False) -> torch.nn.Module:
    from transformers import AutoTokenizer

    from rtd import ElectraPretrainingModel

    args = wt.parse_args([*MODEL_FLAGS, "--tokenizer_name", vocab_dir])
    tokenizer = AutoTokenizer.from_pretrained(vocab_dir)
    disc_config, gen_config = wt.build_model_configs(args, len(tokenizer), tokenizer.pad_token_id)
    for config in (disc_config, gen_config):  # no dropout: the two models then see identical computations
        if not dropout:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    generator, discriminator = wt.build_models(disc_config, gen_config)
    return ElectraPretrainingModel(generator, discriminator, tokenizer)


def step(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.optim.Optimizer:
    torch.manual_seed(1)  # the same masks and samples for both models
    model(input_ids)["loss"].backward()
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def grads(out: str, vocab_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    reference, sharded = build(vocab_dir), build(vocab_dir)
    shard_model(sharded, torch.device("cpu"), "no")
    input_ids = torch.randint(5, 100, (4, 32), generator=torch.Generator().manual_seed(2))
    optimizers = [step(model, input_ids) for model in (reference, sharded)]
    reference_grads = dict(reference.named_parameters())
    difference = {}
    for name, param in sharded.named_parameters():
        full = param.grad.full_tensor()
        expected = reference_grads[name].grad
        difference[name] = ((full - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    for optimizer in optimizers:
        optimizer.step()
    if dist.get_rank() == 0:
        result = {
            "relative_grad_difference": difference,
            "bytes_unsharded": local_state_bytes(reference, optimizers[0]),
            "bytes_fsdp": local_state_bytes(sharded, optimizers[1]),
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def stop_after(step_number: int, argv: list[str]) -> int:
    write_metrics = run_state.write_metrics

    def signal_after_step(run_dir, record):
        write_metrics(run_dir, record)
        if record["step"] == step_number and record["split"] == "train":
            os.kill(os.getpid(), signal.SIGTERM)

    run_state.write_metrics = signal_after_step
    return wt.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "grads":
        grads(sys.argv[2], sys.argv[3])
    else:
        sys.exit(stop_after(int(sys.argv[2]), sys.argv[3:]))
