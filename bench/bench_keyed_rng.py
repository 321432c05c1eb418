"""What keyed masking and sampling (rtd.example_keys) cost: one RTD forward + backward with and without keys.

    OMP_NUM_THREADS=1 python bench/bench_keyed_rng.py                  # tiny 4x2, batch 16 x 64, vocab 30,522

The two modes run interleaved, round after round, in one process (the first two rounds of each are warm-up);
the best and the median step time of each are printed, with the masking alone timed the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rtd  # noqa: E402
from modeling_electra import (  # noqa: E402
    ElectraMoEConfig,
    ElectraMoEForMaskedLM,
    ElectraMoEForPreTraining,
    make_generator_config,
)

WARMUP_ROUNDS = 2


class SpecialIds:
    """The token ids ElectraPretrainingModel needs, without a tokenizer (ids 0-4 as in BERT's vocabulary)."""

    pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 2, 3, 4


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=30522, help="ELECTRA's vocabulary by default")
    parser.add_argument(
        "--rounds", type=int, default=12, help=f"per mode, the first {WARMUP_ROUNDS} not counted"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if args.rounds <= WARMUP_ROUNDS or min(args.batch_size, args.seq_len) < 3 or args.vocab_size < 10:
        parser.error(f"need --rounds > {WARMUP_ROUNDS}, --batch_size and --seq_len >= 3, --vocab_size >= 10")
    return args


def step_times(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per forward + backward, per mode ("global": torch's generator, "keyed": example keys)."""
    torch.manual_seed(0)
    config = ElectraMoEConfig.from_preset("tiny", vocab_size=args.vocab_size, num_experts=4, top_k=2)
    generator, discriminator = (
        ElectraMoEForMaskedLM(make_generator_config(config)),
        ElectraMoEForPreTraining(config),
    )
    model = rtd.ElectraPretrainingModel(generator, discriminator, SpecialIds())
    ids = torch.randint(10, args.vocab_size, (args.batch_size, args.seq_len))
    ids[:, 0], ids[:, -1] = SpecialIds.cls_token_id, SpecialIds.sep_token_id
    attention = torch.ones_like(ids)
    times: dict[str, list[float]] = {"global": [], "keyed": []}
    for step in range(args.rounds):
        for mode in times:
            keys = rtd.example_keys(42, step, range(args.batch_size)) if mode == "keyed" else None
            start = time.perf_counter()
            model(ids, attention, example_keys=keys)["loss"].backward()
            times[mode].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {mode: samples[WARMUP_ROUNDS:] for mode, samples in times.items()}


def masking_ms(args: argparse.Namespace, repeats: int = 20) -> dict[str, float]:
    ids = torch.randint(10, args.vocab_size, (args.batch_size, args.seq_len))
    real = torch.ones_like(ids)
    keys = rtd.example_keys(42, 0, range(args.batch_size))
    result = {}
    for mode, mode_keys in (("global", None), ("keyed", keys)):
        start = time.perf_counter()
        for _ in range(repeats):
            rtd.mask_tokens(ids, real.bool(), real, SpecialIds.mask_token_id, keys=mode_keys)
        result[mode] = (time.perf_counter() - start) / repeats * 1e3
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    times = step_times(args)
    for mode, samples in times.items():
        print(f"{mode}: best {min(samples) * 1e3:.1f} ms, median {statistics.median(samples) * 1e3:.1f} ms")
    best = min(times["keyed"]) / min(times["global"])
    median = statistics.median(times["keyed"]) / statistics.median(times["global"])
    print(f"keyed / global: best {best:.3f}, median {median:.3f}")
    masking = masking_ms(args)
    print(f"masking alone: keyed {masking['keyed']:.2f} ms, global {masking['global']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
