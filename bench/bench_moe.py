"""Forward+backward time and peak memory of one MoE feed-forward layer against dense and naive baselines.

For each shape (ELECTRA-Small: hidden 256, experts of 1024, 128 x 128 tokens; ELECTRA-Base: 768, 3072,
16 x 512 tokens) and each (num_experts, top_k) it times, in one process and interleaved round by round:

- `dense`: ELECTRA's own FFN (transformers' ElectraIntermediate + ElectraOutput) with intermediate size
  top_k x expert size, i.e. the same active compute; the practical limit for an MoE layer.
- `loop`, `grouped_mm`: the project's `ElectraMoEBlock` with each dispatch path.
- `ec_loop`, `ec_grouped_mm`: the same block with expert-choice routing (Zhou et al. 2022, each expert
  takes top_k x tokens / experts tokens of each sequence, i.e. capacity factor top_k: the compute of
  top-k token choice) with each dispatch path.
- `sort_slice`: a plain sort-then-slice loop (stacked weights, `unbind`, `torch.cat`, gate multiply,
  `index_add`), the straightforward dropless dispatch, kept as a reference.
- `naive_mask`: the original study's pattern, a Python loop over `nn.Linear` experts with boolean masks.
- `hf_eager`, `hf_grouped_mm`, `hf_batched_mm`: transformers' `NemotronHExperts` (non-gated up/down MLP,
  the only transformers experts class with ELECTRA's FFN shape; it has no biases, ours are zero) under each
  `experts_implementation`, with the project's router, dropout and LayerNorm around it.

Every MoE variant uses the same router, routes the same way and adds the Switch load-balancing and
router z-losses; their outputs are checked against the project's block before timing. The table shows the
best of the timed rounds (noise on a shared machine only adds time, in bursts; medians, CPU times, the
per-round paired ratio and every sample are in the JSON); the ratio is dense / method (1.0 = as fast as
dense at equal active compute).
Peak memory is what the layer allocates during one forward+backward above what was live before (parameter
gradients included): `torch.cuda.max_memory_allocated` on CUDA and the allocation events of
`torch.profiler` on CPU (exact bytes from PyTorch's allocator, unlike RSS). Results: a markdown table on
stdout and JSON under `bench/results/`. `--profile` adds a `torch.profiler` pass over the block at the
largest expert count (op table in the JSON, time split into router, sort, gather/scatter, expert matmuls
and the rest printed).

    python bench/bench_moe.py --quick           # about a minute on 2 cores
    python bench/bench_moe.py --profile         # the full grid (tens of minutes on 2 CPU cores)

On CPU, `THP_MEM_ALLOC_ENABLE=1` makes PyTorch back allocations of 2 MB and more with transparent huge
pages, so fresh activation and gradient buffers are not paid for in 4 KB page faults (which otherwise cost
the MoE layer, whose weight gradients are E times the dense layer's, up to a third of a weight-gradient
matmul). With OpenMP's default wait policy idle threads spin before sleeping; `OMP_WAIT_POLICY=PASSIVE`
makes every parallel region wake a sleeping thread, which costs the variants with many small ops up to 1.6x
on a quiet machine but protects them from a busy neighbour. Both settings are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import ElectraConfig
from transformers.models.electra.modeling_electra import ElectraIntermediate, ElectraOutput

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from input_checks import EXIT_BAD_INPUT  # noqa: E402
from modeling_electra import ElectraMoEBlock, ElectraMoEConfig  # noqa: E402
from modeling_electra_config import PRESETS  # noqa: E402
from outputs import render_table, write_json_atomically  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"


@dataclass(frozen=True)
class Shape:
    """One model size: hidden and expert widths from the ELECTRA paper, tokens of one training batch."""

    name: str
    hidden: int
    expert: int
    batch: int
    seq_len: int
    experts: tuple[int, ...]
    top_ks: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def preset_shape(
    size: str, batch: int, seq_len: int, experts: tuple[int, ...], top_ks: tuple[int, ...]
) -> Shape:
    """A shape with the hidden and FFN widths of the model size `size` in the config presets."""
    preset = PRESETS[size]
    return Shape(size, preset["hidden_size"], preset["intermediate_size"], batch, seq_len, experts, top_ks)


# ELECTRA-Small trains on 128 sequences of 128 tokens, ELECTRA-Base (here) on 16 of 512.
SMALL = preset_shape("small", batch=128, seq_len=128, experts=(2, 4, 8, 16, 64), top_ks=(1, 2))
BASE = preset_shape("base", batch=16, seq_len=512, experts=(2, 4, 8, 16), top_ks=(1, 2))
QUICK = preset_shape("small", batch=64, seq_len=128, experts=(8, 64), top_ks=(2,))

DENSE = "dense"
PROJECT_METHODS = ("loop", "grouped_mm")
# Expert-choice routing with each dispatch path (`ec_<implementation>`); it computes a different function.
EXPERT_CHOICE_METHODS = ("ec_loop", "ec_grouped_mm")
METHODS = (
    DENSE,
    *PROJECT_METHODS,
    *EXPERT_CHOICE_METHODS,
    "sort_slice",
    "naive_mask",
    "hf_eager",
    "hf_grouped_mm",
    "hf_batched_mm",
)
ELECTRA_ACT = "gelu"
ELECTRA_DROPOUT = 0.1
ELECTRA_INIT_STD = 0.02
HEAD_DIM = 64
# Outputs are compared on this many tokens before timing (dropless routing is per token).
CHECK_TOKENS = 512
# hf_batched_mm gathers one weight matrix per routed token; skip it when that would exceed this.
MAX_GATHER_BYTES = 2**30
DEFAULT_REPEATS = 3


def add_common_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options both benchmarks take (bench_pretrain.py imports this)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    """Which (shape, experts, top-k) cases to run (bench_expert_gemms.py imports this and `config_grid`)."""
    parser.add_argument("--shapes", nargs="+", choices=("small", "base"), default=("small", "base"))
    parser.add_argument("--experts", type=int, nargs="+", help="override the expert counts")
    parser.add_argument("--top_k", type=int, nargs="+", help="override the top-k values")
    parser.add_argument("--tokens", type=int, help="override the tokens per batch (a multiple of seq_len)")


def config_grid(args: argparse.Namespace) -> list[tuple[Shape, int, int]] | None:
    """(shape, num_experts, top_k) for every requested case; None, after saying why, if --tokens does not fit."""
    shapes = [QUICK] if args.quick else [s for s in (SMALL, BASE) if s.name in args.shapes]
    configs = []
    for shape in shapes:
        if args.tokens:
            if args.tokens % shape.seq_len:
                print(f"error: --tokens must be a multiple of seq_len {shape.seq_len}", file=sys.stderr)
                return None
            shape = Shape(**{**shape.__dict__, "batch": args.tokens // shape.seq_len})
        for num_experts in args.experts or shape.experts:
            for top_k in args.top_k or shape.top_ks:
                if top_k <= num_experts:
                    configs.append((shape, num_experts, top_k))
    return configs


def parse_common_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, check the shared options and resolve `--device auto` to cuda when available, else cpu."""
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    return args


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, quick_help="small shapes, 8,192 tokens, 8 and 64 experts, top-2")
    add_grid_args(parser)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--profile", action="store_true", help="also profile the block at the largest E")
    parser.add_argument(
        "--output", type=Path, help="JSON path (default bench/results/bench_moe_<device>.json)"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_argument_parser()
    args = parse_common_args(parser, argv)
    if DENSE not in args.methods:
        parser.error("--methods must include dense (every ratio is relative to it)")
    return args


# ----------------------------------------------------------------------------------------------------------
# The layers being compared
# ----------------------------------------------------------------------------------------------------------


def moe_config(
    shape: Shape, num_experts: int, top_k: int, implementation: str = "loop", expert_choice: bool = False
) -> ElectraMoEConfig:
    """The benchmark's block; expert choice at capacity factor top_k (the compute of top-k token choice)."""
    routing = dict(router_type="expert_choice", capacity_factor=float(top_k)) if expert_choice else {}
    return ElectraMoEConfig(
        vocab_size=2,
        hidden_size=shape.hidden,
        num_hidden_layers=1,
        num_attention_heads=max(1, shape.hidden // HEAD_DIM),
        intermediate_size=shape.expert,
        num_experts=num_experts,
        top_k=top_k,
        hidden_act=ELECTRA_ACT,
        hidden_dropout_prob=ELECTRA_DROPOUT,
        moe_implementation=implementation,
        **routing,
    )


class DenseFFN(nn.Module):
    """ELECTRA's feed-forward block (transformers' modules), `intermediate = top_k x expert` wide."""

    def __init__(self, shape: Shape, intermediate: int):
        super().__init__()
        config = ElectraConfig(
            hidden_size=shape.hidden,
            intermediate_size=intermediate,
            hidden_act=ELECTRA_ACT,
            hidden_dropout_prob=ELECTRA_DROPOUT,
        )
        self.intermediate = ElectraIntermediate(config)
        self.output = ElectraOutput(config)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.output(self.intermediate(hidden), hidden), None


class ProjectMoE(nn.Module):
    """The project's block; its loss term is the weighted router loss the models add."""

    def __init__(self, block: ElectraMoEBlock, config: ElectraMoEConfig):
        super().__init__()
        self.block = block
        self.aux_coef, self.z_coef = config.router_aux_loss_coef, config.router_z_loss_coef

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, router = self.block(hidden)
        return out, self.aux_coef * router.aux_loss + self.z_coef * router.z_loss


def switch_router_loss(
    logits: torch.Tensor, probs: torch.Tensor, top_ids: torch.Tensor, aux_coef: float, z_coef: float
) -> torch.Tensor:
    """Switch load-balancing + ST-MoE z-loss, the same terms the project's block computes."""
    num_experts = probs.shape[-1]
    fraction = torch.bincount(top_ids.reshape(-1), minlength=num_experts).float() / top_ids.numel()
    aux = num_experts * torch.sum(fraction * probs.mean(0))
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return aux_coef * aux + z_coef * z


class BaselineMoE(nn.Module):
    """Shared router, dropout and LayerNorm of a baseline; subclasses implement `dispatch`."""

    def __init__(self, block: ElectraMoEBlock, config: ElectraMoEConfig):
        super().__init__()
        self.router, self.dropout, self.LayerNorm = block.router, block.dropout, block.LayerNorm
        self.aux_coef, self.z_coef = config.router_aux_loss_coef, config.router_z_loss_coef

    def dispatch(self, x: torch.Tensor, gates: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden.reshape(-1, hidden.shape[-1])
        logits, probs, gates, top_ids = self.router(x)
        y = self.dispatch(x, gates, top_ids)
        out = self.LayerNorm(self.dropout(y.view_as(hidden)) + hidden)
        return out, switch_router_loss(logits, probs, top_ids, self.aux_coef, self.z_coef)


class SortSliceMoE(BaselineMoE):
    """Plain sort-then-slice dropless dispatch: one matmul pair per expert on its contiguous slice."""

    def __init__(self, block: ElectraMoEBlock, config: ElectraMoEConfig):
        super().__init__(block, config)
        self.experts = block.experts

    def dispatch(self, x: torch.Tensor, gates: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
        top_k = top_ids.shape[1]
        slot_expert = top_ids.reshape(-1)
        order = torch.argsort(slot_expert, stable=True)
        token = order // top_k
        counts = torch.bincount(slot_expert, minlength=self.experts.weight_in.shape[0]).tolist()
        x_sorted = x.index_select(0, token)
        experts = self.experts
        outputs = [
            torch.addmm(b_out, experts.act(torch.addmm(b_in, chunk, w_in)), w_out)
            for chunk, w_in, b_in, w_out, b_out in zip(
                x_sorted.split(counts),
                experts.weight_in.unbind(0),
                experts.bias_in.unbind(0),
                experts.weight_out.unbind(0),
                experts.bias_out.unbind(0),
                strict=True,
            )
        ]
        out = torch.cat(outputs) * gates.reshape(-1).index_select(0, order).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token, out)


class NaiveMaskMoE(BaselineMoE):
    """The original study's dispatch: per expert, boolean-mask the tokens routed to it."""

    def __init__(self, block: ElectraMoEBlock, config: ElectraMoEConfig):
        super().__init__(block, config)
        experts = block.experts
        num_experts, hidden, intermediate = experts.weight_in.shape
        self.experts = nn.ModuleList()
        for e in range(num_experts):
            expert = nn.Sequential(
                nn.Linear(hidden, intermediate), experts.act, nn.Linear(intermediate, hidden)
            )
            with torch.no_grad():
                expert[0].weight.copy_(experts.weight_in[e].t())
                expert[0].bias.copy_(experts.bias_in[e])
                expert[2].weight.copy_(experts.weight_out[e].t())
                expert[2].bias.copy_(experts.bias_out[e])
            self.experts.append(expert)

    def dispatch(self, x: torch.Tensor, gates: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = top_ids == e
            token_mask = chosen.any(dim=-1)
            if not token_mask.any():
                continue
            gate = (gates * chosen).sum(dim=-1, keepdim=True)[token_mask]
            y[token_mask] += gate * expert(x[token_mask])
        return y


class HFExpertsMoE(BaselineMoE):
    """transformers' `NemotronHExperts` (up -> act -> down, no bias) under one `experts_implementation`."""

    def __init__(self, block: ElectraMoEBlock, config: ElectraMoEConfig, implementation: str):
        super().__init__(block, config)
        from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        experts = block.experts
        if any(b.abs().max() > 0 for b in (experts.bias_in, experts.bias_out)):
            raise ValueError("NemotronHExperts has no biases: benchmark it against zero expert biases")
        num_experts, hidden, intermediate = experts.weight_in.shape
        hf_config = NemotronHConfig(
            hidden_size=hidden,
            n_routed_experts=num_experts,
            moe_intermediate_size=intermediate,
            mlp_hidden_act=config.hidden_act,
            num_hidden_layers=1,
        )
        hf_config._experts_implementation = implementation
        self.experts = NemotronHExperts(hf_config)
        with torch.no_grad():
            self.experts.up_proj.copy_(experts.weight_in.transpose(1, 2))
            self.experts.down_proj.copy_(experts.weight_out.transpose(1, 2))

    def dispatch(self, x: torch.Tensor, gates: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
        return self.experts(x, top_ids, gates.to(x.dtype))


def build_methods(
    shape: Shape, num_experts: int, top_k: int, methods: tuple[str, ...], dtype_bytes: int
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """All requested layers with identical expert weights; returns (modules, {method: why it was skipped})."""
    config = moe_config(shape, num_experts, top_k)
    block = ElectraMoEBlock(config)
    with torch.no_grad():
        for weight in (block.router.weight, block.experts.weight_in, block.experts.weight_out):
            weight.normal_(0.0, ELECTRA_INIT_STD)
        block.experts.bias_in.zero_()
        block.experts.bias_out.zero_()
    modules: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for method in methods:
        if method == DENSE:
            modules[method] = DenseFFN(shape, top_k * shape.expert)
        elif method in PROJECT_METHODS or method in EXPERT_CHOICE_METHODS:
            expert_choice = method in EXPERT_CHOICE_METHODS
            cfg = moe_config(shape, num_experts, top_k, method.removeprefix("ec_"), expert_choice)
            twin = ElectraMoEBlock(cfg)
            twin.load_state_dict(block.state_dict())
            modules[method] = ProjectMoE(twin, cfg)
        elif method == "sort_slice":
            modules[method] = SortSliceMoE(block, config)
        elif method == "naive_mask":
            modules[method] = NaiveMaskMoE(block, config)
        else:
            implementation = method.removeprefix("hf_")
            gather_bytes = 2 * shape.tokens * top_k * shape.hidden * shape.expert * dtype_bytes
            if implementation == "batched_mm" and gather_bytes > MAX_GATHER_BYTES:
                skipped[method] = f"gathers a weight matrix per routed token: {gather_bytes / 2**30:.0f} GiB"
                continue
            try:
                modules[method] = HFExpertsMoE(block, config, implementation)
            except ImportError as err:
                skipped[method] = f"transformers has no NemotronHExperts ({err})"
    return modules, skipped


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on CUDA (fp32 master weights, as in mixed-precision training); plain fp32 on CPU."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def clear_grads(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> None:
    """One training step of the layer: forward, backward into the input and every parameter."""
    with autocast_for(x.device, dtype):
        out, loss_term = module(x)
    tensors, grads = [out], [grad_out.to(out.dtype)]
    if loss_term is not None:
        tensors.append(loss_term)
        grads.append(torch.ones_like(loss_term))
    torch.autograd.backward(tensors, grads)


@dataclass(frozen=True)
class AllocationStats:
    """What PyTorch allocated on the CPU while a function ran (bytes)."""

    peak: int
    total: int
    largest: int


def cpu_allocation_stats(fn: Callable[[], None]) -> AllocationStats:
    """Replay the profiler's allocation/free events in order: peak live bytes above the start, total bytes
    allocated and the largest single allocation. Exact and deterministic, unlike RSS (which mixes in the C
    allocator's caching and other processes' pressure); blocks allocated before `fn` and freed inside it are
    not counted.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = total = largest = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
        if nbytes > 0:
            total += nbytes
            largest = max(largest, nbytes)
    return AllocationStats(peak=peak, total=total, largest=largest)


def peak_memory_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by PyTorch while `fn` runs, above what was live when it started.

    CUDA: the caching allocator's statistics. CPU: `cpu_allocation_stats`.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return cpu_allocation_stats(fn).peak


def check_outputs(modules: dict[str, nn.Module], x: torch.Tensor, dtype: torch.dtype) -> None:
    """Every token-choice variant must compute the project's function, every expert-choice variant the
    project's expert-choice function (eval mode, so dropout is off)."""
    sample = x.detach()[: max(1, CHECK_TOKENS // x.shape[1])]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad(), autocast_for(x.device, dtype):
        outputs = {}
        for name, module in modules.items():
            if name != DENSE:
                outputs[name] = module.eval()(sample)[0].float()
                module.train()
    for name, out in outputs.items():
        expert_choice = name in EXPERT_CHOICE_METHODS
        reference_name = next(m for m in outputs if (m in EXPERT_CHOICE_METHODS) == expert_choice)
        error = (out - outputs[reference_name]).abs().max().item()
        if error > tolerance:
            raise RuntimeError(f"{name} differs from {reference_name} by {error:.2e} (> {tolerance})")


def time_methods(
    modules: dict[str, nn.Module],
    x: torch.Tensor,
    grad_out: torch.Tensor,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved rounds (the method order rotates each round) so machine noise hits all methods alike.

    Returns wall-clock and process CPU seconds per step; on a shared machine the CPU time is the steadier
    of the two (it leaves out time spent descheduled). Sample i of every method comes from round i, so
    `paired_ratio` (the median over rounds of dense / method) compares steps taken seconds apart.
    """
    names = list(modules)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            clear_grads(modules[name], x)
            synchronize(x.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            forward_backward(modules[name], x, grad_out, dtype)
            synchronize(x.device)
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def routed_tokens_per_expert(
    modules: dict[str, nn.Module], x: torch.Tensor, num_experts: int, top_k: int
) -> list[int]:
    """How many token slots the shared router's top-k choices send to each expert for this input (the load
    balance of token choice)."""
    moe = next(module for name, module in modules.items() if name != DENSE)
    router = moe.block.router if isinstance(moe, ProjectMoE) else moe.router
    with torch.no_grad():
        top_ids = router(x.reshape(-1, x.shape[-1]))[1].topk(top_k, dim=-1).indices
    return torch.bincount(top_ids.reshape(-1), minlength=num_experts).tolist()


def bench_layer_config(
    shape: Shape,
    num_experts: int,
    top_k: int,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    torch.manual_seed(0)
    dtype_bytes = torch.finfo(dtype).bits // 8
    modules, skipped = build_methods(shape, num_experts, top_k, tuple(args.methods), dtype_bytes)
    for module in modules.values():
        module.to(device).train()
    x = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    check_outputs(modules, x, dtype)
    load_before = os.getloadavg()[0]
    wall, cpu = time_methods(modules, x, grad_out, dtype, args.warmup, args.repeats)
    dense_ms, dense_cpu_ms = statistics.median(wall[DENSE]) * 1e3, statistics.median(cpu[DENSE]) * 1e3
    results = {}
    for name, samples in wall.items():
        ms, cpu_ms = statistics.median(samples) * 1e3, statistics.median(cpu[name]) * 1e3
        results[name] = dict(
            ms=ms,
            ratio=dense_ms / ms,
            min_ms=min(samples) * 1e3,
            min_ratio=min(wall[DENSE]) / min(samples),
            cpu_ms=cpu_ms,
            cpu_ratio=dense_cpu_ms / cpu_ms,
            paired_ratio=statistics.median(d / t for d, t in zip(wall[DENSE], samples, strict=True)),
            samples_ms=[t * 1e3 for t in samples],
            param_grad_mb=sum(p.numel() * p.element_size() for p in modules[name].parameters()) / 2**20,
        )
    if not args.no_memory:
        for name, module in modules.items():
            clear_grads(module, x)
            results[name]["peak_mb"] = (
                peak_memory_bytes(lambda m=module: forward_backward(m, x, grad_out, dtype), device) / 2**20
            )
        for name in modules:
            results[name]["memory_ratio"] = results[name]["peak_mb"] / results[DENSE]["peak_mb"]
    return dict(
        shape=shape.name,
        hidden=shape.hidden,
        expert=shape.expert,
        tokens=shape.tokens,
        num_experts=num_experts,
        top_k=top_k,
        dense_intermediate=top_k * shape.expert,
        methods=results,
        skipped=skipped,
        load_average=(load_before, os.getloadavg()[0]),
        tokens_per_expert=routed_tokens_per_expert(modules, x, num_experts, top_k),
    )


# ----------------------------------------------------------------------------------------------------------
# Profile of the project's block
# ----------------------------------------------------------------------------------------------------------

PROFILE_ROUNDS = 3
# Which part of an MoE layer each op belongs to (aten names, forward and backward).
OP_CATEGORIES = {
    "expert matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::grouped_mm"),
    "activation": ("aten::gelu", "aten::gelu_backward"),
    "bias grads": ("aten::sum",),
    "sort/bookkeeping": (
        "aten::sort",
        "aten::argsort",
        "aten::bincount",
        "aten::cumsum",
        "aten::arange",
        "aten::repeat",
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::histc",
    ),
    "gather/scatter/combine": (
        "aten::index_select",
        "aten::index_add",
        "aten::index_add_",
        "aten::scatter_add_",
        "aten::index",
        "aten::index_put_",
        "aten::_index_put_impl_",
        "aten::cat",
        "aten::stack",
        "aten::mul",
        "aten::zeros",
        "aten::zero_",
        "aten::fill_",
        "aten::copy_",
        "aten::empty",
        "aten::empty_strided",
    ),
    "router (softmax/top-k/losses)": (
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::topk",
        "aten::logsumexp",
        "aten::exp",
        "aten::log",
        "aten::amax",
        "aten::mean",
        "aten::clamp_min",
    ),
    "LayerNorm/dropout/residual": (
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
        "aten::native_dropout",
        "aten::native_dropout_backward",
        "aten::bernoulli_",
        "aten::add",
        "aten::add_",
    ),
}


def profile_layer(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> dict:
    """Self time per op and per category of one profiled forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    clear_grads(module, x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        forward_backward(module, x, grad_out, dtype)
        synchronize(x.device)
        wall_ms = (time.perf_counter() - start) * 1e3
    averages = prof.key_averages()
    attr = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    ops = {event.key: getattr(event, attr) / 1e3 for event in averages if getattr(event, attr) > 0}
    categories = dict.fromkeys(OP_CATEGORIES, 0.0)
    categories["other ops"] = 0.0
    for op, ms in ops.items():
        category = next((c for c, names in OP_CATEGORIES.items() if op in names), "other ops")
        categories[category] += ms
    table = averages.table(sort_by=attr, row_limit=25)
    # Whatever the ops' self times do not cover: Python, dispatch, profiler overhead (CPU only).
    return dict(total_ms=sum(ops.values()), wall_ms=wall_ms, categories=categories, ops=ops, table=table)


def profile_report(
    shape: Shape, num_experts: int, top_k: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """Profile the project's block and the dense-equal-compute FFN at one configuration, interleaved, and
    keep each one's fastest profiled step (a single step on a shared machine often catches a burst)."""
    torch.manual_seed(0)
    implementation = "grouped_mm" if device.type == "cuda" else "loop"
    modules, _ = build_methods(
        shape, num_experts, top_k, (DENSE, implementation), torch.finfo(dtype).bits // 8
    )
    x = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    report = dict(shape=shape.name, num_experts=num_experts, top_k=top_k, tokens=shape.tokens)
    for module in modules.values():
        module.to(device).train()
        forward_backward(module, x, grad_out, dtype)
    for _ in range(PROFILE_ROUNDS):
        for name, module in modules.items():
            profiled = profile_layer(module, x, grad_out, dtype)
            if name not in report or profiled["wall_ms"] < report[name]["wall_ms"]:
                report[name] = profiled
    return report


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def machine_description(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=threads,
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default)"),
        thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE", "(unset)"),
        malloc_env={name: value for name, value in os.environ.items() if name.startswith("MALLOC_")},
        device=str(device),
        python=platform.python_version(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_tables(rows: list[dict], methods: list[str]) -> str:
    """One table of ms (ratio dense / method) and, when measured, one of peak MB (ratio method / dense).

    Times are the best of the rounds: on a shared machine the noise only ever adds time, in bursts that
    can double a sample, so the minimum is the steadiest estimate of what the code costs.
    """
    header = ["shape", "tokens", "experts", "top-k"] + methods

    def table(title: str, value_key: str, ratio_key: str) -> list[str]:
        cells = []
        for row in rows:
            line = [row["shape"], str(row["tokens"]), str(row["num_experts"]), str(row["top_k"])]
            for method in methods:
                result = row["methods"].get(method)
                if result is None or value_key not in result:
                    line.append("skipped" if method in row["skipped"] else "–")
                elif method == DENSE:
                    line.append(f"{result[value_key]:.0f}")
                else:
                    line.append(f"{result[value_key]:.0f} ({result[ratio_key]:.2f})")
            cells.append(line)
        return [title, "", render_table(pd.DataFrame(cells, columns=header), "markdown")]

    lines = table(
        "Forward+backward time, best of the timed rounds, ms (dense ÷ method: 1.0 = as fast as dense at equal"
        " active compute; medians and every sample are in the JSON)",
        "min_ms",
        "min_ratio",
    )
    if any("peak_mb" in r for row in rows for r in row["methods"].values()):
        lines += [""] + table(
            "Peak memory of forward+backward, MB (method ÷ dense)", "peak_mb", "memory_ratio"
        )
    notes = {m: why for row in rows for m, why in row["skipped"].items()}
    lines += [""] + [f"- {m} skipped: {why} (largest case)" for m, why in sorted(notes.items())]
    return "\n".join(lines)


# bench_pretrain.py writes its results with the same function under this name.
write_json = write_json_atomically


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    configs = config_grid(args)
    if configs is None:
        return EXIT_BAD_INPUT

    started = time.perf_counter()
    rows = []
    for shape, num_experts, top_k in tqdm(configs, desc="configs"):
        rows.append(bench_layer_config(shape, num_experts, top_k, args, device, dtype))
    payload = dict(
        benchmark="bench_moe",
        command="python bench/bench_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine_description(device, args.threads),
        dtype=str(dtype).removeprefix("torch."),
        repeats=args.repeats,
        rows=rows,
    )
    if args.profile:
        shape, num_experts, _ = max(configs, key=lambda c: (c[0].hidden == 256, c[1]))
        top_ks = sorted({k for s, e, k in configs if (s, e) == (shape, num_experts)})
        payload["profile"] = [profile_report(shape, num_experts, k, device, dtype) for k in top_ks]
    payload["wall_s"] = time.perf_counter() - started

    table = markdown_tables(rows, [m for m in METHODS if m in args.methods])
    print(table)
    for report in payload.get("profile", []):
        print(f"\nProfile at {report['shape']}, {report['num_experts']} experts, top-{report['top_k']}:")
        for name in (m for m in report if m in METHODS):
            total = report[name]["total_ms"]
            parts = ", ".join(f"{c} {ms:.0f} ms" for c, ms in report[name]["categories"].items() if ms >= 1)
            outside = report[name]["wall_ms"] - total
            print(f"- {name}: {total:.0f} ms in ops ({parts}); {outside:.0f} ms outside ops")
    suffix = "_quick" if args.quick else ""
    output = args.output or RESULTS_DIR / f"bench_moe_{device.type}{suffix}.json"
    write_json_atomically(output, payload)
    print(f"\nwrote {output} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
