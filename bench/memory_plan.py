"""Which multi-GPU mode fits: parameters and bytes per GPU of an ELECTRA-MoE pretraining run.

For a size, expert count, top-k, per-GPU batch, sequence length, GPU count and GPU memory it prints the
parameters (generator + discriminator, the shared embeddings once; counted from the trainer's own configs
and equal to the built models, tests/test_memory_plan.py), the bytes per GPU of weights, gradients and AdamW
state under DDP and FSDP, an activation estimate with and without --gradient_checkpointing, and which
mode fits. `--table` prints docs/pretraining.md's fit table; `--measure` compares the estimate with the
peak RSS of real training steps on the CPU (tiny and small).

    python bench/memory_plan.py --model_size base --num_experts 64 --num_gpus 8 --gpu_memory_gib 80
    python bench/memory_plan.py --table
    python bench/memory_plan.py --measure

What is counted (fp32 master weights, as the trainer keeps them; bf16 only in compute):
- DDP, per GPU: weights 4 B + gradients 4 B + AdamW moments 8 B per parameter, plus DDP's gradient
  buckets (4 B; accelerate keeps gradient_as_bucket_view off).
- FSDP, per GPU: those 16 B / GPUs, plus what is gathered at a time: the root unit (embeddings and heads,
  kept gathered through the step), the largest encoder layer twice (the one computing and the one being
  prefetched) in the compute dtype, and its unsharded gradient in fp32 before the reduce-scatter.
- Activations (per GPU, saved for the backward): per token and layer, attention 6H + A elements with
  SDPA, the models' default (inputs, Q, K, V, context, output; a log-sum-exp per head; eager attention
  would add 2.25 A S: scores, dropout mask at 1 byte, dropped probabilities), a dense FFN 3H + 2I,
  an MoE block 3H + 2E + k (H + 2 I_e) (router logits and probabilities, each routed slot's input,
  pre-activation and activation); the generator's logits at the 15% masked positions (V floats, twice).
  With checkpointing: each layer's input (H) plus one layer's activations recomputed at a time.
  The CPU's expert loop keeps its per-expert activations on the autograd context, which checkpointing does
  not free (moe_dispatch.ExpertLoopFunction); on the GPU the grouped_mm path is autograd and is freed.
- Not counted: the CUDA context and allocator fragmentation (a margin: `--reserve_gib`, default 4 GiB).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import wikitext_trainer as wt  # noqa: E402
from rtd import MASK_PROB  # noqa: E402

ELECTRA_VOCAB_SIZE = 30522
GIB = 2**30
RESERVE_GIB = 4.0
GPUS_GIB = {"H100 80GB": 80, "H200 141GB": 141}
TABLE_SIZES = ("small", "base", "large")
TABLE_EXPERTS = (1, 8, 64)
TABLE_GPUS = 8
MODES = ("DDP", "FSDP", "FSDP + ckpt")
MEASURED = {"tiny": (8, 16, 128), "small": (8, 16, 128)}  # size: experts, batch, sequence length


# --- Parameters -----------------------------------------------------------------------------------------------


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def embedding_parameters(config) -> int:
    e = config.embedding_size
    size = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * e + 2 * e
    return size


def layer_parameters(config, moe: bool) -> int:
    """One encoder layer: attention (Q, K, V, output, LayerNorm) and a dense FFN or an MoE block."""
    h = config.hidden_size
    attention = 4 * linear(h, h) + 2 * h
    if not moe:
        return attention + linear(h, config.intermediate_size) + linear(config.intermediate_size, h) + 2 * h
    e, i = config.num_experts, config.expert_intermediate_size
    routers = 2 if config.router_type == "noisy_topk" else 1
    return attention + routers * e * h + e * (h * i + i + i * h + h) + 2 * h


def encoder_parameters(config) -> list[int]:
    """The encoder's layers, in order (the FSDP units)."""
    moe = set(config.moe_layer_indices)
    return [layer_parameters(config, i in moe) for i in range(config.num_hidden_layers)]


def project_parameters(config) -> int:
    return (
        linear(config.embedding_size, config.hidden_size)
        if config.embedding_size != config.hidden_size
        else 0
    )


def count_parameters(disc, gen) -> dict[str, int]:
    """Parameters of ElectraPretrainingModel(generator, discriminator): `layers` (every encoder layer of
    both), `root` (embeddings once, projections, heads) and `total`."""
    h, hg, e = disc.hidden_size, gen.hidden_size, gen.embedding_size
    heads = linear(h, h) + linear(h, 1)  # discriminator: dense + prediction
    heads += linear(hg, e) + 2 * e + gen.vocab_size  # generator: dense + LayerNorm + LM bias (weight tied)
    root = embedding_parameters(disc) + project_parameters(disc) + project_parameters(gen) + heads
    layers = encoder_parameters(disc) + encoder_parameters(gen)
    return {"layers": layers, "root": root, "total": root + sum(layers)}


# --- Memory ---------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    parameters: int
    per_gpu: dict[str, dict[str, float]]  # mode -> component -> bytes
    fits: dict[str, bool]


def layer_activation_elements(config, seq_len: int, moe: bool, eager_attention: bool = False) -> float:
    """Elements saved for the backward per token by one layer (see the module docstring)."""
    h, a = config.hidden_size, config.num_attention_heads
    attention = 6 * h + (2.25 * a * seq_len if eager_attention else a)
    if not moe:
        return attention + 3 * h + 2 * config.intermediate_size
    k = config.top_k if config.router_type != "expert_choice" else config.capacity_factor
    return attention + 3 * h + 2 * config.num_experts + k * (h + 2 * config.expert_intermediate_size)


def activation_bytes(disc, gen, tokens: int, seq_len: int, bytes_per: int, checkpointing: bool) -> float:
    per_layer = []
    for config in (disc, gen):
        moe = set(config.moe_layer_indices)
        per_layer += [
            (layer_activation_elements(config, seq_len, i in moe), config.hidden_size)
            for i in range(config.num_hidden_layers)
        ]
    if checkpointing:
        elements = sum(h for _, h in per_layer) + max(e for e, _ in per_layer)
    else:
        elements = sum(e for e, _ in per_layer)
    logits = 2 * MASK_PROB * gen.vocab_size * 4  # fp32 logits and their softmax at the masked positions
    embeddings = 2 * (disc.embedding_size + disc.hidden_size)
    return tokens * (elements * bytes_per + logits + embeddings * bytes_per)


def plan(
    disc, gen, batch: int, seq_len: int, gpus: int, gpu_gib: float, bf16: bool, reserve_gib: float
) -> Plan:
    counts = count_parameters(disc, gen)
    p, compute = counts["total"], 2 if bf16 else 4
    tokens = batch * seq_len
    acts = activation_bytes(disc, gen, tokens, seq_len, compute, checkpointing=False)
    acts_ckpt = activation_bytes(disc, gen, tokens, seq_len, compute, checkpointing=True)
    largest = max(counts["layers"])
    gathered = counts["root"] * compute + 2 * largest * compute + largest * 4
    ddp = {"weights": 4 * p, "gradients": 4 * p + 4 * p, "adamw": 8 * p, "gathered": 0.0, "activations": acts}
    fsdp = {"weights": 4 * p / gpus, "gradients": 4 * p / gpus, "adamw": 8 * p / gpus, "gathered": gathered}
    per_gpu = {
        "DDP": ddp,
        "FSDP": {**fsdp, "activations": acts},
        "FSDP + ckpt": {**fsdp, "activations": acts_ckpt},
    }
    budget = (gpu_gib - reserve_gib) * GIB
    return Plan(p, per_gpu, {mode: sum(parts.values()) <= budget for mode, parts in per_gpu.items()})


def configs(
    size: str,
    experts: int,
    top_k: int,
    seq_len: int,
    generator_moe: bool = False,
    vocab: int = ELECTRA_VOCAB_SIZE,
):
    """The trainer's discriminator and generator configs for these flags (its presets and size rule)."""
    flags = ["--model_size", size, "--num_experts", str(experts), "--top_k", str(min(top_k, experts))]
    flags += ["--max_seq_length", str(seq_len), "--learning_rate", "1e-4"]  # (no effect on memory)
    flags += ["--generator_moe"] if generator_moe else []
    return wt.build_model_configs(wt.parse_args(flags), vocab)


# --- Output ---------------------------------------------------------------------------------------------------


def describe(args: argparse.Namespace) -> str:
    disc, gen = configs(
        args.model_size, args.num_experts, args.top_k, args.max_seq_length, args.generator_moe
    )
    result = plan(disc, gen, args.batch_size, args.max_seq_length, args.num_gpus, args.gpu_memory_gib,
                  args.mixed_precision == "bf16", args.reserve_gib)  # fmt: skip
    lines = [f"{args.model_size}, {args.num_experts} experts, top-{args.top_k}: {result.parameters / 1e9:.3f} B "
             f"parameters; batch {args.batch_size} x {args.max_seq_length} per GPU, {args.num_gpus} GPUs of "
             f"{args.gpu_memory_gib:g} GiB ({args.reserve_gib:g} GiB reserved)", "",
             "| mode | weights | gradients | AdamW | gathered | activations | total GiB | fits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for mode, parts in result.per_gpu.items():
        cells = " | ".join(
            f"{parts[key] / GIB:.2f}" for key in ("weights", "gradients", "adamw", "gathered", "activations")
        )
        lines.append(
            f"| {mode} | {cells} | {sum(parts.values()) / GIB:.2f} | {'yes' if result.fits[mode] else 'no'} |"
        )
    return "\n".join(lines)


def fit_table(batch: int, seq_len: int, gpus: int) -> str:
    lines = [f"Per-GPU batch {batch} x {seq_len} tokens, bf16 compute, {gpus} GPUs, top-2 (dense: 1 expert), "
             f"{RESERVE_GIB:g} GiB reserved; cells: DDP / FSDP / FSDP + ckpt (GiB per GPU, * = fits)", "",
             "| size | experts | parameters | " + " | ".join(GPUS_GIB) + " |",
             "| --- | --- | --- |" + " --- |" * len(GPUS_GIB)]  # fmt: skip
    for size in TABLE_SIZES:
        for experts in TABLE_EXPERTS:
            disc, gen = configs(size, experts, 2, seq_len)
            cells = []
            for gib in GPUS_GIB.values():
                result = plan(disc, gen, batch, seq_len, gpus, gib, True, RESERVE_GIB)
                cells.append(" / ".join(
                    f"{sum(result.per_gpu[m].values()) / GIB:.0f}{'*' if result.fits[m] else ''}" for m in MODES))  # fmt: skip
            lines.append(
                f"| {size} | {experts} | {result.parameters / 1e9:.2f} B | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def measure(size: str, experts: int, batch: int, seq_len: int, steps: int = 2) -> dict[str, float]:
    """Peak RSS growth of real training steps (the trainer's build_training_run and train_step, one CPU
    process, fp32) against this planner's DDP estimate for one GPU (no buckets: one process has no DDP)."""
    import torch
    from accelerate import Accelerator
    from transformers import BertTokenizerFast

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import write_vocab_dir  # the tests' small vocabulary; the planner is given its size

    vocab_dir = write_vocab_dir(Path(__import__("tempfile").mkdtemp()) / "vocab")
    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir))
    disc, gen = configs(size, experts, 2, seq_len, vocab=len(tokenizer))
    args = wt.parse_args(
        [
            "--model_size",
            size,
            "--num_experts",
            str(experts),
            "--top_k",
            "2",
            "--max_seq_length",
            str(seq_len),
        ]
    )
    accelerator = Accelerator(cpu=True)
    start = time.perf_counter()
    # A first step of a toy model loads what the runtime loads lazily (kernels, autograd threads): not counted.
    for model_args, b, s in (
        (wt.parse_args(["--model_size", "tiny", "--max_seq_length", "16"]), 1, 16),
        (args, batch, seq_len),
    ):
        model_disc, model_gen = configs(
            model_args.model_size, model_args.num_experts, 2, s, vocab=len(tokenizer)
        )
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run = wt.build_training_run(model_args, tokenizer, model_disc, model_gen, steps, accelerator)
        input_ids = torch.randint(5, len(tokenizer), (b, s))
        for _ in range(steps):
            wt.train_step(run, accelerator, {"input_ids": input_ids}, 1.0)
        del run
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    estimate = plan(disc, gen, batch, seq_len, 1, 1e9, False, 0).per_gpu["DDP"]
    estimate = sum(estimate.values()) - 4 * count_parameters(disc, gen)["total"]  # no DDP buckets
    return {
        "measured_mib": peak / 2**20,
        "estimate_mib": estimate / 2**20,
        "seconds": time.perf_counter() - start,
    }


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_size", default="base", choices=("tiny", "small", "base", "large"))
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--generator_moe", action="store_true")
    parser.add_argument("--batch_size", type=int, default=32, help="per GPU")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--num_gpus", type=int, default=8)
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0)
    parser.add_argument("--reserve_gib", type=float, default=RESERVE_GIB, help="CUDA context, fragmentation")
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="bf16")
    parser.add_argument("--table", action="store_true", help="the fit table of docs/pretraining.md")
    parser.add_argument(
        "--measure", action="store_true", help="estimate vs peak RSS on the CPU (tiny, small)"
    )
    parser.add_argument("--measure_one", choices=MEASURED, help=argparse.SUPPRESS)  # one per process
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    for name in ("num_experts", "top_k", "batch_size", "max_seq_length", "num_gpus"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.gpu_memory_gib <= args.reserve_gib:
        parser.error("--gpu_memory_gib must exceed --reserve_gib")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(fit_table(args.batch_size, args.max_seq_length, args.num_gpus))
    elif args.measure_one:
        experts, batch, seq = MEASURED[args.measure_one]
        m = measure(args.measure_one, experts, batch, seq)
        print(f"| {args.measure_one} | {experts} | {batch} x {seq} | {m['measured_mib']:.0f} | "
              f"{m['estimate_mib']:.0f} | {m['measured_mib'] / m['estimate_mib']:.2f} |", flush=True)  # fmt: skip
    elif args.measure:  # each size in its own process: peak RSS is a high-water mark
        print("| size | experts | batch x seq | measured peak RSS growth MiB | estimate MiB | ratio |")
        print("| --- | --- | --- | --- | --- | --- |", flush=True)
        for size in MEASURED:
            subprocess.run([sys.executable, __file__, "--measure_one", size], check=True)
    else:
        print(describe(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
