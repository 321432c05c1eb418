"""Tokens per second and model FLOPs utilisation of a full ELECTRA replaced-token-detection training step,
and of the data pipeline.

The step is `wikitext_trainer.py`'s own: its `build_training_run` builds the models and the objective
(`rtd.ElectraPretrainingModel`: masking 15%, generator MLM on the masked positions, sampling the replacements,
discriminator RTD loss x 50, both models' router losses; shared embeddings), AdamW with ELECTRA's parameter
groups and the schedule, and its `train_step` runs forward, backward, gradient clipping and the AdamW step.
Per size (`--sizes`, default `small`: batch 128 x 128 tokens; `base`: batch 128 x 512 tokens) it times the
configurations of `--configs`, one step of each per round, interleaved. The default grid is the dense
baseline, a dense model whose discriminator FFN is twice as wide (`dense-2x`: the same active compute as
the top-2 MoE models, same generator) and the study's six MoE configurations (experts {2, 4, 8} x top-k
{1, 2}). The ratio is the MoE model's tokens/s divided by that of the dense model with the same active
compute (dense for top-1, dense-2x for top-2): 1.0 = as fast. Step times are the best of the timed rounds
(medians and every sample are in the JSON), as in bench_moe. Each step's model FLOPs are counted by
`rtd_step_flops` (its docstring says how); TFLOP/s is that over the step time, and MFU that over
`--peak_tflops` (on CUDA the H200 SXM's spec-sheet bf16 dense peak, 989, unless given; not shown on CPU unless given).

The data part (when ../shared/data is present) runs the trainer's WikiText pipeline on WikiText-2
(validation + test, 2.4 MB) with ELECTRA's vocabulary and `--example_format packed`: articles -> tokenize
-> pack into 128-token blocks (tokens/s), the first `prepare_blocks` call (tokenize, pack and write the
on-disk cache) and the cached reload. Results: markdown on stdout and JSON under `bench/results/`.

    python bench/bench_pretrain.py --quick      # about a minute on 2 cores
    python bench/bench_pretrain.py              # all configurations at batch 128
    python bench/bench_pretrain.py --device cuda --sizes small base --configs dense dense-2x moe8-top2 moe64-top1
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import pretrain_data  # noqa: E402
import pretrain_documents  # noqa: E402
import rtd  # noqa: E402
import wikitext_trainer as wt  # noqa: E402
from bench.bench_moe import (  # noqa: E402
    RESULTS_DIR,
    add_common_args,
    machine_description,
    parse_common_args,
    synchronize,
    write_json,
)
from bench.gpu_check import H200_BF16_DENSE_TFLOPS  # noqa: E402
from modeling_electra_config import MAX_POSITION_EMBEDDINGS, PRESETS  # noqa: E402
from moe_dispatch import expert_choice_capacity  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ELECTRA_VOCAB = SHARED_DATA / "electra-vocab"
WIKITEXT2 = SHARED_DATA / "wikitext-2"
# ELECTRA's uncased WordPiece vocabulary ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), used for
# the step benchmark's token ids when the vocabulary files are not available.
ELECTRA_VOCAB_SIZE = 30522
ELECTRA_SPECIAL_IDS = dict(pad=0, unk=100, cls=101, sep=102, mask=103)
FIRST_WORD_ID = 999

STUDY_EXPERTS = (2, 4, 8)
STUDY_TOP_K = (1, 2)
QUICK_BATCH = 16
SEQ_LEN = pretrain_data.MAX_SEQ_LENGTH  # the data part's blocks
# Sizes the step benchmark takes (`large` with 64 experts would not fit one GPU), their sequence length
# (ELECTRA-Small 128 tokens, Base 512; the paper's Table 6) and batch. ELECTRA-Base trains with batch 256;
# 128 x 512 here keeps the four-model GPU grid (64x1 at base alone holds ~59 GB of fp32 weights, gradients
# and AdamW moments) inside one H200's memory.
STEP_SIZES = ("tiny", "small", "base")
SEQ_LEN_BY_SIZE = {"tiny": SEQ_LEN, "small": SEQ_LEN, "base": MAX_POSITION_EMBEDDINGS}
BATCH_BY_SIZE = {"tiny": 128, "small": 128, "base": 128}
CONFIG_NAME = re.compile(r"dense(?:-(?P<wide>[1-9]\d*)x)?|moe(?P<experts>[1-9]\d*)-(?:top|ec)(?P<k>[1-9]\d*)")
CONFIG_HELP = (
    "configurations: dense, dense-<m>x (discriminator FFN m times as wide), moe<E>-top<k> (token choice) or "
    "moe<E>-ec<c> (expert choice at capacity factor c) (default: dense, dense-2x and the study's "
    "moe{2,4,8}-top{1,2}; with --quick dense, dense-2x, moe8-top2)"
)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, quick_help="dense, dense-2x and 8 experts top-2 at batch 16")
    parser.add_argument("--sizes", nargs="+", choices=STEP_SIZES, default=["small"], help="model sizes")
    parser.add_argument("--configs", nargs="+", metavar="NAME", help=CONFIG_HELP)
    parser.add_argument(
        "--batch_size",
        type=int,
        help=f"sequences per step (default {BATCH_BY_SIZE}; {QUICK_BATCH} with --quick)",
    )
    parser.add_argument(
        "--max_seq_length", type=int, help=f"tokens per sequence (default by size: {SEQ_LEN_BY_SIZE})"
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        help=f"peak TFLOP/s the MFU is relative to (default on CUDA: {H200_BF16_DENSE_TFLOPS}, the H200 SXM's "
        "spec-sheet bf16 dense peak; on CPU no MFU unless given)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="the trainer's --compile (each encoder layer, inductor)"
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="the trainer's --gradient_checkpointing"
    )
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--skip_data", action="store_true", help="skip the data-pipeline part")
    parser.add_argument(
        "--trim_memory",
        action="store_true",
        help="return freed memory to the OS after every step: with eight models alive glibc otherwise keeps "
        "~21 GB resident in the full run (15 GB with it), but every step then page-faults its activations "
        "afresh, which costs the MoE models more than the dense ones",
    )
    parser.add_argument(
        "--output", type=Path, help="JSON path (default bench/results/bench_pretrain_<device>.json)"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_argument_parser()
    args = parse_common_args(parser, argv)
    for flag in ("batch_size", "max_seq_length", "peak_tflops"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be > 0")
    if args.max_seq_length is not None and not 3 <= args.max_seq_length <= MAX_POSITION_EMBEDDINGS:
        parser.error(f"--max_seq_length must be between 3 and {MAX_POSITION_EMBEDDINGS}")
    for name in args.configs or []:
        match = CONFIG_NAME.fullmatch(name)
        if match is None:
            parser.error(f"--configs: unknown configuration {name!r}; {CONFIG_HELP}")
        if match["experts"] and "-top" in name and int(match["k"]) > int(match["experts"]):
            parser.error(f"--configs {name}: top-k must be at most the number of experts")
    if args.configs and len(set(args.configs)) != len(args.configs):
        parser.error("--configs: a configuration is named twice")
    return args


# ----------------------------------------------------------------------------------------------------------
# Model FLOPs
# ----------------------------------------------------------------------------------------------------------


def masked_per_sequence(seq_len: int, mask_prob: float = rtd.MASK_PROB) -> int:
    """Positions `rtd.mask_tokens` masks in a sequence of `seq_len` real tokens (the benchmark has no padding)."""
    return max(1, min(rtd.max_predictions_per_seq(seq_len, mask_prob), round(mask_prob * seq_len)))


def expert_slots_per_token(config, batch: int, seq_len: int) -> float:
    """Expert FFNs each token runs through on average: top_k for token choice (dropless; a capacity limit
    can only drop slots, so this is the intended compute), and for expert choice every expert's
    `expert_choice_capacity` tokens per group (a sequence, or the batch) over the group's tokens (~ the
    capacity factor)."""
    if config.router_type != "expert_choice":
        return config.top_k
    group = seq_len if config.expert_choice_scope == "sequence" else batch * seq_len
    capacity = expert_choice_capacity(config.capacity_factor, group, config.num_experts)
    return config.num_experts * capacity / group


def encoder_flops_per_token(config, batch: int, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one `ElectraMoEModel`: the embedding projection (when
    embedding_size != hidden_size) and every layer's attention and dense or MoE feed-forward block."""
    h = config.hidden_size
    attention = 2 * 4 * h * h + 2 * 2 * seq_len * h  # Q, K, V, output projections; Q K^T and scores x V
    dense_ffn = 2 * 2 * h * config.intermediate_size
    router = 2 * h * config.num_experts * (2 if config.router_type == "noisy_topk" else 1)  # + noise logits
    expert_ffn = 2 * 2 * h * config.expert_intermediate_size
    moe_ffn = router + expert_slots_per_token(config, batch, seq_len) * expert_ffn
    moe_layers = len(config.moe_layer_indices)
    layers = config.num_hidden_layers * attention + moe_layers * moe_ffn
    layers += (config.num_hidden_layers - moe_layers) * dense_ffn
    projection = 2 * config.embedding_size * h if config.embedding_size != h else 0
    return layers + projection


def rtd_step_flops(
    disc_config, gen_config, batch: int, seq_len: int, mask_prob: float = rtd.MASK_PROB
) -> float:
    """Model FLOPs of one RTD training step on `batch` full sequences of `seq_len` tokens.

    Counted: the matmuls, at 2 FLOPs per multiply-add, of
    - both encoders on every token (`encoder_flops_per_token`): per layer the Q, K, V and output
      projections (4 x 2 h^2), the attention scores Q K^T and their product with V (2 x 2 seq_len h,
      all seq_len keys: the encoder is bidirectional), and the feed-forward block: dense 2 x 2 h i, or MoE
      with only the active experts (top_k x 2 x 2 h i_expert per token; expert choice its capacity, about
      capacity_factor x) plus the router (2 h E; twice with noisy top-k's noise logits); and the projection
      from the shared embeddings when embedding_size != h;
    - the generator's MLM head on the masked positions only, as `rtd.ElectraPretrainingModel` computes it
      (`masked_per_sequence` per sequence): dense h_gen -> embedding_size, then embedding_size -> vocabulary;
    - the discriminator head on every token: dense h -> h, then h -> 1.
    Forward plus backward is 3 x the forward (the backward computes the gradients of both each matmul's
    input and its weight). Not counted: embedding lookups, layer norms, softmax, activations, biases,
    dropout, the sampling of replacements, the losses and the optimizer (elementwise work, not matmuls).
    """
    tokens = batch * seq_len
    h, e, v = disc_config.hidden_size, disc_config.embedding_size, disc_config.vocab_size
    discriminator = tokens * (encoder_flops_per_token(disc_config, batch, seq_len) + 2 * h * h + 2 * h)
    masked = batch * masked_per_sequence(seq_len, mask_prob)
    mlm_head = masked * (2 * gen_config.hidden_size * e + 2 * e * v)
    generator = tokens * encoder_flops_per_token(gen_config, batch, seq_len) + mlm_head
    return 3 * (discriminator + generator)


# ----------------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------------


def load_bench_tokenizer():
    """ELECTRA's vocabulary from ../shared/data, or just its special-token ids (all the step needs)."""
    if (ELECTRA_VOCAB / "vocab.txt").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(ELECTRA_VOCAB))
    ids = ELECTRA_SPECIAL_IDS
    return SimpleNamespace(
        mask_token_id=ids["mask"],
        pad_token_id=ids["pad"],
        cls_token_id=ids["cls"],
        sep_token_id=ids["sep"],
        all_special_ids=sorted(ids.values()),
        vocab_size=ELECTRA_VOCAB_SIZE,
    )


def config_names(args: argparse.Namespace) -> list[str]:
    """`--configs`, or the default grid: dense, dense-2x and the study's MoE configurations (--quick: 8x2)."""
    if args.configs:
        return list(args.configs)
    grid = [(8, 2)] if args.quick else [(e, k) for e in STUDY_EXPERTS for k in STUDY_TOP_K]
    return ["dense", "dense-2x", *(f"moe{e}-top{k}" for e, k in grid)]


def config_spec(name: str, size: str) -> dict:
    """(name, trainer flags, the dense model of equal active compute) for a configuration name at a size."""
    match = CONFIG_NAME.fullmatch(name)
    if match["experts"] is None:
        wide = int(match["wide"] or 1)
        flags = ["--intermediate_size", str(wide * PRESETS[size]["intermediate_size"])] if wide > 1 else []
        return dict(name=name, flags=flags, reference=name)
    k = int(match["k"])
    flags = ["--num_experts", match["experts"]]
    if "-ec" in name:
        flags += ["--router_type", "expert_choice", "--capacity_factor", str(k)]
    else:
        flags += ["--top_k", str(k)]
    return dict(name=name, flags=flags, reference="dense" if k == 1 else f"dense-{k}x")


def build_training(
    size: str, flags: list[str], seq_len: int, tokenizer, vocab_size: int, accelerator, steps: int
):
    """The trainer's own training run (`wikitext_trainer.build_training_run`: models, objective, AdamW,
    schedule) for these flags, with the dense model's generator; returns (run, trainer arguments, configs)."""
    sized = ["--model_size", size, "--max_seq_length", str(seq_len)]
    args = wt.parse_args([*sized, *flags])
    disc_config, _ = wt.build_model_configs(args, vocab_size, tokenizer.pad_token_id)
    _, gen_config = wt.build_model_configs(wt.parse_args(sized), vocab_size, tokenizer.pad_token_id)
    run = wt.build_training_run(args, tokenizer, disc_config, gen_config, steps, accelerator)
    return run, args, (disc_config, gen_config)


def random_blocks(
    batch: int, seq_len: int, vocab_size: int, device: torch.device, seed: int = 0
) -> torch.Tensor:
    """`[CLS] words... [SEP]` blocks of random word ids (speed does not depend on which words)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch, seq_len), generator=generator)
    ids[:, 0] = ELECTRA_SPECIAL_IDS["cls"]
    ids[:, -1] = ELECTRA_SPECIAL_IDS["sep"]
    return ids.to(device)


def release_freed_memory() -> None:
    """Hand memory freed by the last step back to the OS (glibc only), outside the timed region."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build_runs(
    args: argparse.Namespace, size: str, seq_len: int, tokenizer, vocab_size: int, accelerator
) -> dict:
    """Every configuration's training run at this size, with its parameter count and model FLOPs per step."""
    batch = args.batch_size or (QUICK_BATCH if args.quick else BATCH_BY_SIZE[size])
    runs = {}
    for name in config_names(args):
        config = config_spec(name, size)
        # Created and initialised on the device: 64x1 at base has 3.6 G parameters, slow to fill on the host.
        scaling = [f"--{flag}" for flag in ("compile", "gradient_checkpointing") if getattr(args, flag)]
        with torch.device(accelerator.device):
            run, trainer_args, (disc, gen) = build_training(
                size, [*config["flags"], *scaling], seq_len, tokenizer, vocab_size, accelerator,
                args.warmup + args.repeats,
            )  # fmt: skip
        params = sum(p.numel() for p in run.model.parameters())
        flops = rtd_step_flops(disc, gen, batch, seq_len, trainer_args.mask_prob)
        runs[name] = dict(config=config, run=run, max_grad_norm=trainer_args.max_grad_norm, params=params,
                          batch=batch, flops=flops, times=[], cpu=[], peak=[], scaling=scaling)  # fmt: skip
    return runs


def time_rounds(args: argparse.Namespace, runs: dict, input_ids: torch.Tensor, accelerator) -> None:
    """Warm-up and timed rounds, one step per configuration per round, the order rotating every round."""
    device = accelerator.device
    names = list(runs)
    for round_index in tqdm(range(args.warmup + args.repeats), desc="rounds"):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs, _ = wt.train_step(
                run["run"], accelerator, {"input_ids": input_ids}, run["max_grad_norm"]
            )
            run["loss"] = outputs["loss"].item()
            synchronize(device)
            if round_index >= args.warmup:
                run["times"].append(time.perf_counter() - start)
                run["cpu"].append(time.process_time() - start_cpu)
                if device.type == "cuda":
                    run["peak"].append(torch.cuda.max_memory_allocated(device) / 2**30)
            if args.trim_memory:
                release_freed_memory()


def step_rows(runs: dict, size: str, seq_len: int, peak_tflops: float | None) -> list[dict]:
    rows = []
    for name, run in runs.items():
        seconds, tokens = min(run["times"]), run["batch"] * seq_len
        reference = runs.get(run["config"]["reference"])
        row = dict(size=size, name=name, flags=run["config"]["flags"], reference=run["config"]["reference"],
                   parameters=run["params"], batch=run["batch"], seq_len=seq_len, tokens_per_step=tokens,
                   step_s=seconds, tokens_per_s=tokens / seconds, flops_per_step=run["flops"],
                   tflops_per_s=run["flops"] / seconds / 1e12, scaling=run["scaling"])  # fmt: skip
        if peak_tflops:
            row["mfu"] = row["tflops_per_s"] / peak_tflops
        median = statistics.median(run["times"])
        row.update(ratio=None, median_step_s=median, median_ratio=None, cpu_ratio=None)
        if reference is not None:
            row.update(ratio=min(reference["times"]) / seconds,
                       median_ratio=statistics.median(reference["times"]) / median,
                       cpu_ratio=statistics.median(reference["cpu"]) / statistics.median(run["cpu"]))  # fmt: skip
        if run["peak"]:
            row["peak_memory_gib"] = max(run["peak"])
        row.update(samples_s=run["times"], final_loss=run["loss"])
        rows.append(row)
    return rows


def bench_size(args: argparse.Namespace, size: str, accelerator, tokenizer, vocab_size: int) -> list[dict]:
    """Build, time and report every configuration at one size; the models are freed before returning."""
    seq_len = args.max_seq_length or SEQ_LEN_BY_SIZE[size]
    torch.manual_seed(0)
    runs = build_runs(args, size, seq_len, tokenizer, vocab_size, accelerator)
    batch = next(iter(runs.values()))["batch"]
    time_rounds(args, runs, random_blocks(batch, seq_len, vocab_size, accelerator.device), accelerator)
    rows = step_rows(runs, size, seq_len, args.peak_tflops)
    runs.clear()
    gc.collect()
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_steps(args: argparse.Namespace, device: torch.device, save=None) -> tuple[list[dict], list[dict]]:
    """(rows, errors): every size in turn; a size that runs out of GPU memory is recorded and skipped.
    `save(rows, errors)` is called after each size, so a run cut short keeps what it measured."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.mixed_precision)
    tokenizer = load_bench_tokenizer()
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    rows, errors = [], []
    for size in args.sizes:
        try:
            rows += bench_size(args, size, accelerator, tokenizer, vocab_size)
        except torch.OutOfMemoryError as error:
            errors.append(dict(size=size, error=f"out of memory: {str(error).splitlines()[0]}"))
            gc.collect()
            torch.cuda.empty_cache()
        if save is not None:
            save(rows, errors)
    return rows, errors


# ----------------------------------------------------------------------------------------------------------
# Data pipeline
# ----------------------------------------------------------------------------------------------------------


def bench_data(threads: int) -> dict | None:
    """Tokenize+pack throughput and cache build/reload times of the trainer's pipeline on WikiText-2."""
    train, valid = WIKITEXT2 / "wiki.valid.tokens", WIKITEXT2 / "wiki.test.tokens"
    if not (train.is_file() and valid.is_file() and (ELECTRA_VOCAB / "vocab.txt").is_file()):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ELECTRA_VOCAB))
    lines = train.read_text(encoding="utf-8").splitlines()
    start = time.perf_counter()
    articles = list(pretrain_documents.group_into_articles(lines))
    blocks = 0
    for i in range(0, len(articles), pretrain_data.TOKENIZE_BATCH_SIZE):
        batch = {"text": articles[i : i + pretrain_data.TOKENIZE_BATCH_SIZE]}
        blocks += len(pretrain_data.tokenize_into_blocks(batch, tokenizer, SEQ_LEN)["input_ids"])
    pack_s = time.perf_counter() - start

    cache_dir = Path(tempfile.mkdtemp(prefix="bench-pretrain-cache-"))
    try:
        argv = [
            "--train_file",
            str(train),
            "--validation_file",
            str(valid),
            "--tokenizer_name",
            str(ELECTRA_VOCAB),
        ]
        argv += ["--data_cache_dir", str(cache_dir), "--preprocessing_num_workers", str(threads)]
        argv += ["--example_format", "packed"]  # the packing timed above (ELECTRA's examples are the default)
        trainer_args = wt.parse_args(argv)
        source = pretrain_data.describe_data_source(trainer_args)
        start = time.perf_counter()
        first = pretrain_data.prepare_blocks(trainer_args, tokenizer, source)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        again = pretrain_data.prepare_blocks(trainer_args, tokenizer, source)
        reload_s = time.perf_counter() - start
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    cached_tokens = sum(len(again[split]["input_ids"]) * SEQ_LEN for split in ("train", "validation"))
    if cached_tokens != sum(len(first[split]["input_ids"]) * SEQ_LEN for split in ("train", "validation")):
        raise RuntimeError("the cached reload returned different blocks")
    return dict(
        corpus="WikiText-2 validation (train) + test (validation), ELECTRA uncased vocabulary",
        articles=len(articles),
        packed_tokens=blocks * SEQ_LEN,
        tokenize_pack_s=pack_s,
        tokenize_pack_tokens_per_s=blocks * SEQ_LEN / pack_s,
        workers=threads,
        cache_build_s=build_s,
        cache_build_tokens_per_s=cached_tokens / build_s,
        cache_reload_s=reload_s,
        cached_tokens=cached_tokens,
    )


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def step_table(rows: list[dict]) -> list[str]:
    """One markdown table per size; the MFU column only when the rows have one."""
    lines = []
    for size in dict.fromkeys(row["size"] for row in rows):
        sized = [row for row in rows if row["size"] == size]
        mfu, peak = "mfu" in sized[0], "peak_memory_gib" in sized[0]
        lines += [f"RTD training step (generator + discriminator + AdamW), `{size}`, batch {sized[0]['batch']} x "
                  f"{sized[0]['seq_len']} tokens{scaling_note(sized[0])}", ""]  # fmt: skip
        lines += [
            "| model | parameters | step s | tokens/s | TFLOP/s |"
            + (" MFU |" if mfu else "")
            + (" peak GiB |" if peak else "")
            + " vs equal-compute dense |",
            "| --- | --- | --- | --- | --- |"
            + (" --- |" if mfu else "")
            + (" --- |" if peak else "")
            + " --- |",
        ]
        for row in sized:
            versus = (
                "–"
                if row["ratio"] is None or row["name"] == row["reference"]
                else (f"{row['ratio']:.2f} (÷ {row['reference']})")
            )
            lines.append(
                f"| {row['name']} | {row['parameters'] / 1e6:.1f}M | {row['step_s']:.3g} | "
                f"{row['tokens_per_s']:,.0f} | {row['tflops_per_s']:.3g} |"
                + (f" {row['mfu']:.1%} |" if mfu else "")
                + (f" {row['peak_memory_gib']:.2f} |" if peak else "")
                + f" {versus} |"
            )
        lines.append("")
    return lines


def scaling_note(row: dict) -> str:
    """`, --compile, --gradient_checkpointing`: the trainer's scaling flags the step ran with, if any."""
    return "".join(f", {flag}" for flag in row.get("scaling", []))


def markdown(rows: list[dict], data: dict | None, errors: list[dict] = (), skipped_data: bool = False) -> str:
    lines = step_table(rows)
    lines += [f"`{error['size']}` not measured: {error['error']}" for error in errors]
    if data:
        lines += ["", f"Data pipeline ({data['corpus']})", ""]
        lines += ["| stage | time s | tokens/s |", "| --- | --- | --- |"]
        lines.append(
            f"| tokenize + pack ({data['articles']} articles, 1 process) | {data['tokenize_pack_s']:.2f} | "
            f"{data['tokenize_pack_tokens_per_s']:,.0f} |"
        )
        lines.append(
            f"| first prepare_blocks (tokenize, pack, write cache; {data['workers']} workers) | "
            f"{data['cache_build_s']:.2f} | {data['cache_build_tokens_per_s']:,.0f} |"
        )
        lines.append(
            f"| cached reload ({data['cached_tokens']:,} tokens) | {data['cache_reload_s']:.2f} | – |"
        )
    elif not skipped_data:
        lines += ["", "Data pipeline skipped: ../shared/data (wikitext-2, electra-vocab) not found."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if device.type == "cuda" else "no"
    if device.type == "cuda":
        args.peak_tflops = args.peak_tflops or H200_BF16_DENSE_TFLOPS
        # 64x1 at base holds ~59 GB of weights and optimizer state beside the activations: let the caching
        # allocator grow segments instead of fragmenting (read when CUDA first allocates, which is later).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    suffix = "_quick" if args.quick else ""
    output = args.output or RESULTS_DIR / f"bench_pretrain_{device.type}{suffix}.json"
    payload = dict(
        benchmark="bench_pretrain",
        command="python bench/bench_pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine_description(device, args.threads),
        mixed_precision=args.mixed_precision,
        compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
        peak_tflops=args.peak_tflops,
        flops_counted=rtd_step_flops.__doc__.split("\n\n", 1)[1].strip(),
        repeats=args.repeats,
    )

    def save(rows: list[dict], errors: list[dict], data: dict | None = None) -> None:
        payload.update(load_average=os.getloadavg(), steps=rows, errors=errors, data=data,
                       wall_s=time.perf_counter() - started)  # fmt: skip
        write_json(output, payload)

    rows, errors = bench_steps(args, device, save)
    data = None if args.skip_data else bench_data(args.threads)
    save(rows, errors, data)
    print(markdown(rows, data, errors, args.skip_data))
    print(f"\nwrote {output} ({payload['wall_s']:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
