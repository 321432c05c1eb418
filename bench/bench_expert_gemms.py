"""The six matmuls of a feed-forward forward+backward, done once over all tokens or once per expert.

Any per-expert dispatch (the block's `loop`, a boolean-mask loop, `grouped_mm` on CPU, which is a loop of
`mm` calls) runs each expert's matmuls on its own slice of the tokens: with E experts and top-k routing,
a slice holds tokens * top_k / E rows. This benchmark times exactly those matmuls, with perfectly
balanced slices and preallocated outputs, so that no router, gather, scatter, activation or allocation is
in the measurement:

- `dense`: one matmul per kind over all tokens, intermediate width top_k x expert (the same FLOPs);
- `per_expert`: E matmuls per kind on [tokens * top_k / E]-row slices (`mm(..., out=)`), which is what
  every per-expert loop pays;
- `bmm`: one `torch.bmm` over the E equal slices: a batched kernel that can spread whole experts over the
  threads. Real routing is not balanced (at Small shapes the untrained router of bench_moe.py gives 64
  experts 142 to 378 tokens each: `tokens_per_expert` in its JSON), so a loop cannot use it without padding
  every expert to the largest.

The kinds: `up` x @ W_in, `down` h @ W_out, `grad_hidden` dy @ W_out^T, `grad_w_out` h^T @ dy,
`grad_w_in` x^T @ dh, `grad_input` dh @ W_in^T. The ratio dense / per_expert over all six is a ceiling
for any per-expert loop's matmuls on the machine, before its other costs. Times are the best of rounds
interleaved across methods (noise only adds time); every sample is in the JSON under `bench/results/`.

    python bench/bench_expert_gemms.py --quick      # seconds
    python bench/bench_expert_gemms.py              # Small and Base shapes (minutes on 2 CPU cores)
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_moe import (  # noqa: E402
    RESULTS_DIR,
    Shape,
    add_common_args,
    add_grid_args,
    config_grid,
    machine_description,
    parse_common_args,
    synchronize,
)
from input_checks import EXIT_BAD_INPUT  # noqa: E402
from outputs import render_table, write_json_atomically  # noqa: E402

GEMM_METHODS = ("dense", "per_expert", "bmm")
KINDS = ("up", "down", "grad_hidden", "grad_w_out", "grad_w_in", "grad_input")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, quick_help="small shapes, 8,192 tokens, 8 and 64 experts, top-2")
    add_grid_args(parser)
    parser.add_argument(
        "--output", type=Path, help="JSON path (default bench/results/bench_expert_gemms_<device>.json)"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_common_args(build_argument_parser(), argv)


def transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-2, -1)


def matmul_operands(
    tokens: int, hidden: int, width: int, groups: int, device: torch.device, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(a, b, out) per kind, with a leading group dimension of `groups` slices of tokens // groups rows."""
    rows = tokens // groups

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(groups, *size, device=device, dtype=dtype)

    x, dy = rand(rows, hidden), rand(rows, hidden)
    h, dh = rand(rows, width), rand(rows, width)
    w_in, w_out = rand(hidden, width), rand(width, hidden)
    operands = {
        "up": (x, w_in),
        "down": (h, w_out),
        "grad_hidden": (dy, transposed(w_out)),
        "grad_w_out": (transposed(h), dy),
        "grad_w_in": (transposed(x), dh),
        "grad_input": (dh, transposed(w_in)),
    }
    return {
        kind: (a, b, torch.empty(groups, a.shape[1], b.shape[2], device=device, dtype=dtype))
        for kind, (a, b) in operands.items()
    }


def matmul_runner(method: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
    if method == "bmm":
        return lambda: torch.bmm(a, b, out=out)

    def run() -> None:
        for a_e, b_e, out_e in zip(a.unbind(0), b.unbind(0), out.unbind(0), strict=True):
            torch.mm(a_e, b_e, out=out_e)

    return run


def bench_gemm_config(
    shape: Shape,
    num_experts: int,
    top_k: int,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    torch.manual_seed(0)
    tokens = shape.tokens
    # dense: one group of all tokens, width top_k x expert; experts: E groups of tokens * top_k / E rows.
    dense = matmul_operands(tokens, shape.hidden, top_k * shape.expert, 1, device, dtype)
    moe = matmul_operands(tokens * top_k, shape.hidden, shape.expert, num_experts, device, dtype)
    runners = {
        method: {kind: matmul_runner(method, *(dense if method == "dense" else moe)[kind]) for kind in KINDS}
        for method in GEMM_METHODS
    }
    samples = {method: {kind: [] for kind in KINDS} for method in GEMM_METHODS}
    for round_index in range(args.warmup + args.repeats):
        shift = round_index % len(GEMM_METHODS)
        for method in GEMM_METHODS[shift:] + GEMM_METHODS[:shift]:
            for kind, run in runners[method].items():
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                if round_index >= args.warmup:
                    samples[method][kind].append((time.perf_counter() - start) * 1e3)
    results = {}
    for method in GEMM_METHODS:
        best = {kind: min(samples[method][kind]) for kind in KINDS}
        results[method] = dict(
            min_ms=best,
            total_min_ms=sum(best.values()),
            median_ms={kind: statistics.median(samples[method][kind]) for kind in KINDS},
            samples_ms=samples[method],
        )
    for method in GEMM_METHODS:
        results[method]["ratio"] = {
            kind: results["dense"]["min_ms"][kind] / results[method]["min_ms"][kind] for kind in KINDS
        }
        results[method]["total_ratio"] = results["dense"]["total_min_ms"] / results[method]["total_min_ms"]
    return dict(
        shape=shape.name,
        hidden=shape.hidden,
        expert=shape.expert,
        tokens=tokens,
        num_experts=num_experts,
        top_k=top_k,
        rows_per_expert=tokens * top_k // num_experts,
        methods=results,
    )


def gemm_table(rows: list[dict]) -> str:
    header = ["shape", "experts", "top-k", "rows/expert", "method", *KINDS, "all six"]
    cells = []
    for row in rows:
        for method in GEMM_METHODS:
            result = row["methods"][method]
            line = [
                row["shape"],
                str(row["num_experts"]),
                str(row["top_k"]),
                str(row["rows_per_expert"]),
                method,
            ]
            for kind in KINDS:
                ms = result["min_ms"][kind]
                line.append(f"{ms:.1f}" if method == "dense" else f"{ms:.1f} ({result['ratio'][kind]:.2f})")
            total = result["total_min_ms"]
            line.append(f"{total:.0f}" if method == "dense" else f"{total:.0f} ({result['total_ratio']:.2f})")
            cells.append(line)
    title = "Matmul time, best of the timed rounds, ms (dense ÷ method: 1.0 = as fast as one matmul over all tokens)"
    return "\n".join([title, "", render_table(pd.DataFrame(cells, columns=header), "markdown")])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = config_grid(args)
    if configs is None:
        return EXIT_BAD_INPUT
    for shape, num_experts, top_k in configs:
        if (shape.tokens * top_k) % num_experts:
            print(
                f"error: tokens x top-k ({shape.tokens} x {top_k}) must divide into {num_experts} equal "
                "slices; choose --tokens accordingly",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT

    started = time.perf_counter()
    rows = [
        bench_gemm_config(shape, e, k, args, device, dtype) for shape, e, k in tqdm(configs, desc="configs")
    ]
    payload = dict(
        benchmark="bench_expert_gemms",
        command="python bench/bench_expert_gemms.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine_description(device, args.threads),
        dtype=str(dtype).removeprefix("torch."),
        repeats=args.repeats,
        rows=rows,
        wall_s=time.perf_counter() - started,
    )
    output = args.output or RESULTS_DIR / f"bench_expert_gemms_{device.type}.json"
    write_json_atomically(output, payload)
    print(gemm_table(rows))
    print(f"\nwrote {output} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
