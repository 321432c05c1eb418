"""Tokens per second of a full ELECTRA replaced-token-detection training step, and of the data pipeline.

The step is `wikitext_trainer.py`'s own: its `build_training_run` builds the models and the objective
(`rtd.ElectraPretrainingModel`: masking 15%, generator MLM on the masked positions, Gumbel sampling,
discriminator RTD loss x 50, both models' router losses; shared embeddings), AdamW with ELECTRA's parameter
groups and the schedule, and its `train_step` runs forward, backward, gradient clipping and the AdamW step.
At the `small` size (batch 128 x 128 tokens) it times the dense baseline, a dense model whose
discriminator FFN is top-2 x 1024 wide (`dense-2x`: the same active compute as the top-2 MoE models, same
generator), and the study's six MoE configurations (experts {2, 4, 8} x top-k {1, 2}), one step of each
per round, interleaved. The ratio is the MoE model's tokens/s divided by that of the dense model with the
same active compute (dense for top-1, dense-2x for top-2): 1.0 = as fast.
Step times are the best of the timed rounds (medians and every sample are in the JSON), as in bench_moe.

The data part (when ../shared/data is present) runs the trainer's WikiText pipeline on WikiText-2
(validation + test, 2.4 MB) with ELECTRA's vocabulary and `--example_format packed`: articles -> tokenize
-> pack into 128-token blocks (tokens/s), the first `prepare_blocks` call (tokenize, pack and write the
on-disk cache) and the cached reload. Results: markdown on stdout and JSON under `bench/results/`.

    python bench/bench_pretrain.py --quick      # about a minute on 2 cores
    python bench/bench_pretrain.py              # all configurations at batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
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
import wikitext_trainer as wt  # noqa: E402
from bench.bench_moe import (  # noqa: E402
    RESULTS_DIR,
    add_common_args,
    machine_description,
    parse_common_args,
    synchronize,
    write_json,
)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ELECTRA_VOCAB = SHARED_DATA / "electra-vocab"
WIKITEXT2 = SHARED_DATA / "wikitext-2"
# ELECTRA's uncased WordPiece vocabulary ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), used for
# the step benchmark's token ids when the vocabulary files are not available.
ELECTRA_VOCAB_SIZE = 30522
ELECTRA_SPECIAL_IDS = dict(pad=0, unk=100, cls=101, sep=102, mask=103)
FIRST_WORD_ID = 999

MODEL_SIZE = "small"
STUDY_EXPERTS = (2, 4, 8)
STUDY_TOP_K = (1, 2)
SMALL_BATCH, QUICK_BATCH = 128, 16
SEQ_LEN = pretrain_data.MAX_SEQ_LENGTH


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, quick_help="dense, dense-2x and 8 experts top-2 at batch 16")
    parser.add_argument("--batch_size", type=int, help=f"sequences per step (default {SMALL_BATCH})")
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
    args = parse_common_args(parser, argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------------


def load_tokenizer():
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


def study_configs(quick: bool) -> list[dict]:
    """(name, trainer flags, dense reference) for dense, dense-2x and the MoE configurations."""
    configs = [dict(name="dense", flags=[], reference="dense")]
    configs.append(dict(name="dense-2x", flags=["--intermediate_size", "2048"], reference="dense-2x"))
    grid = [(8, 2)] if quick else [(e, k) for e in STUDY_EXPERTS for k in STUDY_TOP_K]
    for experts, top_k in grid:
        configs.append(
            dict(
                name=f"moe{experts}-top{top_k}",
                flags=["--num_experts", str(experts), "--top_k", str(top_k)],
                reference="dense" if top_k == 1 else "dense-2x",
            )
        )
    return configs


def build_training(flags: list[str], tokenizer, vocab_size: int, generator_config, accelerator, steps: int):
    """The trainer's own training run (`wikitext_trainer.build_training_run`: models, objective, AdamW,
    schedule) for these flags; returns (run, trainer arguments, generator config)."""
    args = wt.parse_args(["--model_size", MODEL_SIZE, *flags])
    disc_config, gen_config = wt.build_model_configs(args, vocab_size, tokenizer.pad_token_id)
    if generator_config is not None:
        gen_config = copy.deepcopy(generator_config)
    run = wt.build_training_run(args, tokenizer, disc_config, gen_config, steps, accelerator)
    return run, args, gen_config


def random_blocks(batch: int, vocab_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """`[CLS] words... [SEP]` blocks of random word ids (speed does not depend on which words)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch, SEQ_LEN), generator=generator)
    ids[:, 0] = ELECTRA_SPECIAL_IDS["cls"]
    ids[:, -1] = ELECTRA_SPECIAL_IDS["sep"]
    return ids.to(device)


def release_freed_memory() -> None:
    """Hand memory freed by the last step back to the OS (glibc only), outside the timed region."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bench_steps(args: argparse.Namespace, device: torch.device) -> list[dict]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.mixed_precision)
    device = accelerator.device
    tokenizer = load_tokenizer()
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    batch = args.batch_size or (QUICK_BATCH if args.quick else SMALL_BATCH)
    input_ids = random_blocks(batch, vocab_size, device)
    configs = study_configs(args.quick)

    torch.manual_seed(0)
    generator_config = None
    runs = {}
    for config in configs:
        run, trainer_args, gen_config = build_training(
            config["flags"], tokenizer, vocab_size, generator_config, accelerator, args.warmup + args.repeats
        )
        generator_config = generator_config or gen_config
        params = sum(p.numel() for p in run.model.parameters())
        runs[config["name"]] = dict(
            config=config, run=run, max_grad_norm=trainer_args.max_grad_norm, params=params, times=[], cpu=[]
        )

    names = list(runs)
    for round_index in tqdm(range(args.warmup + args.repeats), desc="rounds"):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
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
            if args.trim_memory:
                release_freed_memory()

    tokens = batch * SEQ_LEN
    rows = []
    for name, run in runs.items():
        seconds = min(run["times"])
        reference = runs[run["config"]["reference"]]
        rows.append(
            dict(
                name=name,
                flags=run["config"]["flags"],
                reference=run["config"]["reference"],
                parameters=run["params"],
                batch=batch,
                tokens_per_step=tokens,
                step_s=seconds,
                tokens_per_s=tokens / seconds,
                ratio=min(reference["times"]) / seconds,
                median_step_s=statistics.median(run["times"]),
                median_ratio=statistics.median(reference["times"]) / statistics.median(run["times"]),
                cpu_ratio=statistics.median(reference["cpu"]) / statistics.median(run["cpu"]),
                samples_s=run["times"],
                final_loss=run["loss"],
            )
        )
    return rows


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
    articles = pretrain_data.group_into_articles(lines)
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
    cached_tokens = sum(split["input_ids"].size for split in again.values())
    if cached_tokens != sum(split["input_ids"].size for split in first.values()):
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


def markdown(rows: list[dict], data: dict | None) -> str:
    lines = ["RTD training step (generator + discriminator + AdamW), `small`", ""]
    lines += [
        "| model | parameters | step s | tokens/s | vs equal-compute dense |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        versus = "–" if row["name"] == row["reference"] else f"{row['ratio']:.2f} (÷ {row['reference']})"
        lines.append(
            f"| {row['name']} | {row['parameters'] / 1e6:.1f}M | {row['step_s']:.2f} | "
            f"{row['tokens_per_s']:,.0f} | {versus} |"
        )
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
    else:
        lines += ["", "Data pipeline skipped: ../shared/data (wikitext-2, electra-vocab) not found."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if device.type == "cuda" else "no"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    rows = bench_steps(args, device)
    data = None if args.skip_data else bench_data(args.threads)
    payload = dict(
        benchmark="bench_pretrain",
        command="python bench/bench_pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine_description(device, args.threads),
        mixed_precision=args.mixed_precision,
        repeats=args.repeats,
        load_average=os.getloadavg(),
        steps=rows,
        data=data,
        wall_s=time.perf_counter() - started,
    )
    print(markdown(rows, data))
    suffix = "_quick" if args.quick else ""
    output = args.output or RESULTS_DIR / f"bench_pretrain_{device.type}{suffix}.json"
    write_json(output, payload)
    print(f"\nwrote {output} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
