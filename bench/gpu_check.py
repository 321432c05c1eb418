"""The GPU check's steps, run by `bench/gpu_check.sh` (which installs the carried wheels first; docs/gpu.md).

Each step runs as a subprocess with its own time box; a failure or a timeout is recorded and the next step
runs. The whole check fits `--budget_s` (default 470 s, inside the 8 minutes a lent H200 call is sized for):
a step never gets more than the time that is left.

1. environment: GPU, compute capability, torch / CUDA / transformers / datasets versions
2. `pytest -m cuda tests/test_cuda.py`
3. `bench/bench_moe.py --device cuda`: Small and Base shapes, E in {8, 16, 64}, k in {1, 2}
4. `bench/bench_pretrain.py --device cuda`: the RTD step's tokens/s and MFU in bf16, small and base,
   dense, dense-2x, 8x2 and 64x1
5. bench_scaling: `bench/bench_pretrain.py` again at base 8x2 with the trainer's --gradient_checkpointing and
   --compile (the CPU dry run: checkpointing only; inductor needs minutes on 2 CPU cores), to compare with
   step 4's base 8x2 row: tokens/s and peak memory
6. `wikitext_trainer.py` small 8x2 bf16 on WikiText-2: checkpoints, is stopped with SIGUSR1 (exit 75),
   resumes and finishes; then `run_glue.py --bf16` on SST-2 (seeded 8k subsample, 1 epoch) from it
7. `gpu_check.json` (everything measured) and `gpu_check.md` (a short summary) in the output folder

Outputs (6 files, all in `--out`): gpu_check.log (every step's output), gpu_check.json, gpu_check.md,
bench_moe.json, bench_pretrain.json, bench_scaling.json. Runs and checkpoints go to a scratch folder that is deleted.

`--cpu-dry-run` runs the same steps at toy sizes on the CPU (the CUDA tests skip, and the summary says so),
so that tests/test_gpu_check.py keeps the kit working between GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from input_checks import EXIT_BAD_INPUT, finished_run_model  # noqa: E402  (stdlib only at import)
from outputs import read_jsonl  # noqa: E402
from provenance import git_output  # noqa: E402
from run_study import resolve_data  # noqa: E402

DEFAULT_BUDGET_S = 470
# Each step's own limit on the GPU, in seconds (the budget left caps it too).
GPU_TIME_BOX = {"environment": 60, "pytest_cuda": 90, "bench_moe": 90, "bench_pretrain": 90,
                "bench_scaling": 60, "pretrain": 150, "glue": 80}  # fmt: skip
DRY_TIME_BOX = {"environment": 60, "pytest_cuda": 60, "bench_moe": 60, "bench_pretrain": 120,
                "bench_scaling": 90, "pretrain": 120, "glue": 90}  # fmt: skip
REQUEUE_EXIT_CODE = 75  # wikitext_trainer.py's "checkpointed after a stop signal, run me again"
RESUMED = re.compile(r"Resumed from \S+ at step (\d+)")
# A spec-sheet value, not a measurement: NVIDIA's H200 datasheet (nvidia.com/en-us/data-center/h200, H200 SXM)
# gives BF16 Tensor Core 1,979 TFLOPS "with sparsity"; dense is half of it. No peak was measured here.
H200_BF16_DENSE_TFLOPS = 989
POLL_S = 0.05

# The sizes of the pretraining + GLUE step: a ~2-minute small 8x2 run on the GPU, a toy run on the CPU.
GPU_PRETRAIN = dict(model_size="small", num_experts=8, top_k=2, mixed_precision="bf16", max_seq_length=128,
                    batch_size=128, max_training_steps=400, warmup_steps=40, learning_rate=5e-4,
                    logging_steps=25, save_steps=100, eval_steps=400, max_eval_blocks=256,
                    preprocessing_num_workers=4, seed=42)  # fmt: skip
DRY_PRETRAIN = dict(model_size="tiny", num_experts=4, top_k=2, mixed_precision="no", max_seq_length=32,
                    batch_size=4, max_training_steps=40, warmup_steps=4, logging_steps=2, save_steps=20,
                    eval_steps=40, max_eval_blocks=8, preprocessing_num_workers=1, seed=42,
                    train_tokenizer=500)  # fmt: skip
GPU_SIGNAL_AT_STEP, DRY_SIGNAL_AT_STEP = 150, 1  # stop once a metrics line reaches this step
SIGNAL_BY_FRACTION = 0.4  # ... or once this share of the step's time box has gone
GPU_GLUE = dict(task_name="sst2", max_train_samples=8000, num_train_epochs=1, seed=42, bf16=True)
# No bf16 here: run_glue.py refuses --bf16 without CUDA (on the CPU runs are fp32).
DRY_GLUE = dict(task_name="sst2", max_train_samples=64, max_eval_samples=64, max_seq_length=32,
                num_train_epochs=1, seed=42)  # fmt: skip


@dataclass
class Step:
    name: str
    status: str = "not run"  # passed, failed, timeout, skipped
    seconds: float = 0.0
    detail: str = ""
    results: dict[str, Any] = field(default_factory=dict)


class Check:
    """Runs commands with a shared deadline, appending their output to one log."""

    def __init__(self, out: Path, budget_s: float, time_box: dict[str, float], python: str):
        self.out, self.time_box, self.python = out, time_box, python
        self.deadline = time.monotonic() + budget_s
        self.log = (out / "gpu_check.log").open("a", buffering=1)

    def limit(self, name: str) -> float:
        return max(0.0, min(self.time_box[name], self.deadline - time.monotonic()))

    def start(self, command: list[str], title: str) -> subprocess.Popen:
        self.log.write(f"\n===== {title}\n$ {' '.join(command)}\n")
        self.log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip

    def wait(self, proc: subprocess.Popen, until: float) -> int | None:
        """The exit status, or None after killing the process group at `until` (monotonic)."""
        try:
            return proc.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.log.write(f"----- killed after its time box ({' '.join(proc.args[:3])} ...)\n")
            return None

    def run(self, command: list[str], title: str, until: float) -> int | None:
        return self.wait(self.start(command, title), until)


def flags(options: dict[str, Any]) -> list[str]:
    from study_config import to_flags

    return to_flags(options)


def step_environment(check: Check, step: Step) -> None:
    code = (
        "import json, platform, torch\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "        'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(gpu=p.name, capability='%d.%d' % (p.major, p.minor), gpu_memory_gib=round(p.total_memory / 2**30, 1),\n"
        "                gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())\n"
        "for name in ('transformers', 'datasets', 'accelerate', 'tokenizers', 'numpy'):\n"
        "    try:\n"
        "        info[name] = __import__(name).__version__\n"
        "    except Exception as error:\n"
        "        info[name] = f'missing ({type(error).__name__})'\n"
        "print('ENV ' + json.dumps(info))\n"
    )
    with tempfile.TemporaryFile("w+") as capture:
        proc = subprocess.run([check.python, "-c", code], stdout=capture, stderr=subprocess.STDOUT,
                              timeout=check.limit("environment"), cwd=REPO_ROOT)  # fmt: skip
        capture.seek(0)
        text = capture.read()
    check.log.write(f"\n===== environment\n{text}")
    lines = [line for line in text.splitlines() if line.startswith("ENV ")]
    if proc.returncode != 0 or not lines:
        step.status, step.detail = "failed", text.strip().splitlines()[-1] if text.strip() else "no output"
        return
    step.results = json.loads(lines[-1][4:])
    step.status = "passed"
    step.detail = ", ".join(f"{k} {step.results.get(k)}" for k in ("gpu", "torch", "cuda", "transformers"))


def step_pytest(check: Check, step: Step, scratch: Path) -> None:
    junit = scratch / "junit.xml"
    command = [check.python, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider",
               "-rs", f"--junitxml={junit}"]  # fmt: skip
    code = check.run(command, "pytest -m cuda", time.monotonic() + check.limit(step.name))
    if code is None:
        step.status = "timeout"
        return
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            outcomes["failed" if kind in ("failure", "error") else kind].append(case.get("name"))
    step.results = outcomes
    counts = ", ".join(f"{len(v)} {k}" for k, v in outcomes.items())
    if code == 0 and outcomes["passed"]:
        step.status, step.detail = "passed", counts
    elif code == 0 and outcomes["skipped"] and not outcomes["passed"]:
        step.status, step.detail = "skipped", f"{counts}: no CUDA GPU"
    else:
        step.status, step.detail = "failed", f"{counts} (exit {code}): {', '.join(outcomes['failed'][:6])}"


def bench_moe_command(dry: bool, output: Path) -> list[str]:
    if dry:
        # One torch thread: two spin-wait against each other on a busy 2-core machine (tests/conftest.py).
        grid = ["--device", "cpu", "--threads", "1", "--shapes", "small", "--experts", "4", "--top_k", "2",
                "--tokens", "128", "--repeats", "1", "--warmup", "0", "--methods", "dense", "loop", "grouped_mm"]  # fmt: skip
    else:
        grid = ["--device", "cuda", "--shapes", "small", "base", "--experts", "8", "16", "64", "--top_k", "1", "2",
                "--repeats", "10", "--warmup", "3", "--methods", "dense", "loop", "grouped_mm", "ec_grouped_mm", "hf_grouped_mm"]  # fmt: skip
    return ["bench/bench_moe.py", *grid, "--output", str(output)]


def bench_pretrain_command(dry: bool, output: Path) -> list[str]:
    """The issue's grid on the GPU (small and base; dense, dense-2x, 8x2, 64x1), the smallest on the CPU."""
    if dry:
        grid = ["--device", "cpu", "--threads", "1", "--sizes", "tiny", "--configs", "dense-2x", "moe8-top2",
                "--batch_size", "2", "--max_seq_length", "32", "--repeats", "1", "--warmup", "0"]  # fmt: skip
    else:
        grid = ["--device", "cuda", "--mixed_precision", "bf16", "--sizes", "small", "base", "--configs", "dense",
                "dense-2x", "moe8-top2", "moe64-top1", "--repeats", "5", "--warmup", "2"]  # fmt: skip
    peak = ["--peak_tflops", str(H200_BF16_DENSE_TFLOPS)]  # the dry run's MFU only exercises the column
    return ["bench/bench_pretrain.py", *grid, *peak, "--skip_data", "--output", str(output)]


def bench_scaling_command(dry: bool, output: Path) -> list[str]:
    """Base 8x2 with --gradient_checkpointing and --compile (step 4 has it without); the CPU dry run at toy
    size with checkpointing only (inductor's C++ compile takes minutes on 2 CPU cores)."""
    if dry:
        grid = ["--device", "cpu", "--threads", "1", "--sizes", "tiny", "--configs", "moe8-top2", "--batch_size",
                "2", "--max_seq_length", "32", "--repeats", "1", "--warmup", "0", "--gradient_checkpointing"]  # fmt: skip
    else:
        grid = ["--device", "cuda", "--mixed_precision", "bf16", "--sizes", "base", "--configs", "moe8-top2",
                "--repeats", "5", "--warmup", "2", "--gradient_checkpointing", "--compile"]  # fmt: skip
    return ["bench/bench_pretrain.py", *grid, "--skip_data", "--output", str(output)]


def step_bench(check: Check, step: Step, command: list[str], output: Path) -> None:
    output.unlink(missing_ok=True)  # a stale file must not pass for this run's results
    code = check.run([check.python, *command], step.name, time.monotonic() + check.limit(step.name))
    if code is None:
        step.status = "timeout"
    elif code != 0 or not output.is_file():
        step.status, step.detail = "failed", f"exit {code}; see gpu_check.log"
    else:
        step.status = "passed"
    with contextlib.suppress(json.JSONDecodeError, OSError):  # what a failed run saved before it stopped
        step.results = summarize_bench(step.name, json.loads(output.read_text()))
    if step.results.get("rows"):
        step.detail = (
            f"{step.detail + '; ' if step.detail else ''}{len(step.results['rows'])} rows in {output.name}"
        )


def summarize_bench(name: str, payload: dict) -> dict:
    """The ratio-to-dense and memory columns of bench_moe, or tokens/s (and MFU if given) of bench_pretrain."""
    rows = []
    if name == "bench_moe":
        for row in payload.get("rows", []):
            methods = row.get("methods", {})
            rows.append({"shape": row.get("shape"), "tokens": row.get("tokens"), "experts": row.get("num_experts"),
                         "top_k": row.get("top_k"),
                         **{f"{m} ratio": r.get("ratio") for m, r in methods.items() if m != "dense"},
                         **{f"{m} peak MB": r.get("peak_mb") for m, r in methods.items()}})  # fmt: skip
    else:
        for row in payload.get("steps", []):
            rows.append({key: row.get(key) for key in ("size", "name", "batch", "seq_len", "tokens_per_s",
                         "tflops_per_s", "mfu", "ratio", "peak_memory_gib") if key in row})  # fmt: skip
        rows += [{"size": error.get("size"), "name": f"not measured: {error.get('error')}"}
                 for error in payload.get("errors", [])]  # fmt: skip
    return {"rows": rows}


def read_run_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [record for _, record in read_jsonl(path)] if path.is_file() else []


def step_pretrain(check: Check, step: Step, scratch: Path, data: str, dry: bool) -> Path | None:
    """Train, stop with SIGUSR1 once a metrics line reaches the signal step, resume, finish."""
    pretrain_data, tokenizer, _, _ = resolve_data(data)
    options = dict(DRY_PRETRAIN if dry else GPU_PRETRAIN)
    if tokenizer:
        options.pop("train_tokenizer", None)
    name = "gpu-check-8x2"
    options.update(
        pretrain_data, **tokenizer, model_save_directory=str(scratch / "pretrain"), model_save_name=name
    )
    if dry:
        options["cpu"] = True
    run_dir = scratch / "pretrain" / name
    begin = time.monotonic()
    until = begin + check.limit(step.name)
    # Stop at the signal step, or earlier if the run is slow, leaving time to resume and finish.
    latest_signal = begin + SIGNAL_BY_FRACTION * (until - begin)
    command = [check.python, "wikitext_trainer.py", *flags({**options, "overwrite_output_dir": True})]
    proc = check.start(command, "pretrain (until SIGUSR1)")
    signal_at = DRY_SIGNAL_AT_STEP if dry else GPU_SIGNAL_AT_STEP
    signalled_at = None
    while proc.poll() is None and time.monotonic() < until:
        steps = [r["step"] for r in read_run_metrics(run_dir)]
        if steps and (max(steps) >= signal_at or time.monotonic() > latest_signal):
            signalled_at = max(steps)
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(POLL_S)
    first = check.wait(proc, until)
    step.results = {"first_exit": first, "signalled_after_step": signalled_at}
    if first != REQUEUE_EXIT_CODE:
        step.status = "timeout" if first is None else "failed"
        step.detail = f"first run exited {first}, expected {REQUEUE_EXIT_CODE} after SIGUSR1 (signalled: {signalled_at})"
        return None
    check.log.flush()
    log_start = Path(check.log.name).stat().st_size
    command = [check.python, "wikitext_trainer.py", *flags({**options, "resume_from_checkpoint": "auto"})]
    second = check.run(command, "pretrain (resume)", until)
    resumed = RESUMED.findall(Path(check.log.name).read_bytes()[log_start:].decode(errors="replace"))
    records = read_run_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") != "train"]
    final_step = max((r["step"] for r in records), default=None)
    step.results.update(second_exit=second, resumed_at_step=int(resumed[-1]) if resumed else None,
                        final_step=final_step, last_train=train[-1] if train else None,
                        last_validation=valid[-1] if valid else None)  # fmt: skip
    finished = finished_run_model(run_dir) is not None
    if second == 0 and resumed and final_step == options["max_training_steps"] and finished:
        step.status = "passed"
        step.detail = f"stopped at step {resumed[-1]}, resumed, finished at {final_step}"
        return run_dir
    step.status = "timeout" if second is None else "failed"
    step.detail = (
        f"resume exited {second}, resumed at {resumed[-1:] or 'no resume line'}, final step {final_step}"
    )
    return None


def step_glue(check: Check, step: Step, scratch: Path, data: str, run_dir: Path | None, dry: bool) -> None:
    if run_dir is None:
        step.status, step.detail = "skipped", "no pretrained model (the pretraining step failed)"
        return
    _, _, glue_data, _ = resolve_data(data)
    options = dict(DRY_GLUE if dry else GPU_GLUE)
    options.update(glue_data, model_name_or_path=str(run_dir), model_name="gpu-check", do_train=True,
                   do_eval=True, output_dir=str(scratch / "glue"), overwrite_output_dir=True)  # fmt: skip
    command = [check.python, "run_glue.py", *flags(options)]
    code = check.run(command, "run_glue", time.monotonic() + check.limit(step.name))
    results = (
        scratch
        / "glue"
        / "gpu-check"
        / options["task_name"]
        / f"seed_{options['seed']}"
        / "eval_results.json"
    )
    if code is None:
        step.status = "timeout"
    elif code != 0 or not results.is_file():
        step.status, step.detail = "failed", f"exit {code}; see gpu_check.log"
    else:
        step.results = json.loads(results.read_text())
        step.status = "passed"
        step.detail = ", ".join(
            f"{k} {v:.4g}" for k, v in step.results.items() if "accuracy" in k or "loss" in k
        )


def markdown_summary(report: dict) -> str:
    env = report["steps"][0]["results"]
    steps = [
        {"step": s["name"], "status": s["status"], "seconds": f"{s['seconds']:.0f}", "detail": s["detail"]}
        for s in report["steps"]
    ]
    lines = [f"# GPU check, {report['date']}{' (CPU dry run)' if report['cpu_dry_run'] else ''}", "",
             f"Commit {report['commit']}; {env.get('gpu', 'no GPU')} (sm {env.get('capability', '-')}), torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, transformers {env.get('transformers')}, datasets "
             f"{env.get('datasets')}; {report['wall_s']:.0f} s.", "", markdown_table(steps)]  # fmt: skip
    for step in report["steps"]:
        rows = step["results"].get("rows") if isinstance(step["results"], dict) else None
        if rows:
            lines += ["", f"## {step['name']}", "", markdown_table(rows)]
    if report["cpu_dry_run"]:
        lines += ["", "CPU dry run: toy sizes; the CUDA tests were skipped (no GPU), so this proves only that "
                  "the kit runs, not the GPU path."]  # fmt: skip
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> str:
    """Rows (dicts, keys in first-seen order, missing cells empty) as one markdown table via outputs.py."""
    import pandas as pd

    from outputs import render_table

    keys = list(dict.fromkeys(k for row in rows for k in row))
    return render_table(pd.DataFrame([{k: fmt(row.get(k)) for k in keys} for row in rows], columns=keys))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def git_commit() -> str:
    return git_output("rev-parse", "--short", "HEAD") or "unknown (no git)"


def default_data() -> str:
    for candidate in (REPO_ROOT / ".gpu_data", REPO_ROOT.parent / "shared" / "data"):
        if (candidate / "wikitext-2").is_dir():
            return str(candidate)
    return "demo"


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-dry-run", dest="cpu_dry_run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO_ROOT / "outputs" / "gpu_check"),
                        help="output folder (default: $OUT, else outputs/gpu_check)")  # fmt: skip
    parser.add_argument(
        "--data", default=None, help="data folder (default: .gpu_data, ../shared/data or demo)"
    )
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S, help="all steps together")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data or default_data()
    if args.data and data not in ("demo", "hub") and not (Path(data) / "wikitext-2").is_dir():
        print(f"error: --data {data} has no wikitext-2/ folder (../shared/data layout)", file=sys.stderr)
        return EXIT_BAD_INPUT
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    check = Check(args.out, args.budget_s, DRY_TIME_BOX if args.cpu_dry_run else GPU_TIME_BOX, args.python)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    names = ["environment", "pytest_cuda", "bench_moe", "bench_pretrain", "bench_scaling", "pretrain", "glue"]
    steps = {name: Step(name) for name in names}
    run_dir = None
    try:
        for name, step in steps.items():
            print(f"[{time.monotonic() - start:5.0f} s] {name} ...", flush=True)
            began = time.monotonic()
            if check.limit(name) <= 0:
                step.status, step.detail = "timeout", "no time left in the budget"
                continue
            try:
                if name == "environment":
                    step_environment(check, step)
                elif name == "pytest_cuda":
                    step_pytest(check, step, scratch)
                elif name == "bench_moe":
                    step_bench(check, step, bench_moe_command(args.cpu_dry_run, args.out / "bench_moe.json"),
                               args.out / "bench_moe.json")  # fmt: skip
                elif name == "bench_pretrain":
                    output = args.out / "bench_pretrain.json"
                    step_bench(check, step, bench_pretrain_command(args.cpu_dry_run, output), output)
                elif name == "bench_scaling":
                    output = args.out / "bench_scaling.json"
                    step_bench(check, step, bench_scaling_command(args.cpu_dry_run, output), output)
                elif name == "pretrain":
                    run_dir = step_pretrain(check, step, scratch, data, args.cpu_dry_run)
                else:
                    step_glue(check, step, scratch, data, run_dir, args.cpu_dry_run)
            except Exception as error:  # a broken step is reported; the others still run
                step.status, step.detail = "failed", f"{type(error).__name__}: {error}"
            step.seconds = time.monotonic() - began
            print(f"        {step.status}: {step.detail}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
              "cpu_dry_run": args.cpu_dry_run, "data": data, "wall_s": time.monotonic() - start,
              "peak_bf16_tflops": H200_BF16_DENSE_TFLOPS, "steps": [asdict(s) for s in steps.values()]}  # fmt: skip
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    summary = markdown_summary(report)
    (args.out / "gpu_check.md").write_text(summary)
    print("\n" + summary)
    ok = {"passed", "skipped"} if args.cpu_dry_run else {"passed"}
    return 0 if all(step.status in ok for step in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
