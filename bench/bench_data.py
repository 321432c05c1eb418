"""Pretraining data at scale: preparation speed and peak memory, and the peak memory of a 2-process run.

    .venv/bin/python bench/bench_data.py --scales 1 20 --workers 1 2

For each scale s, a WikiText corpus s times WikiText-2 (the shared validation + test articles, shuffled and
repeated, written under --work_dir) is prepared by the trainer's pipeline (`prepare_blocks`, ELECTRA
examples, ELECTRA's vocabulary) once per worker count in a fresh process and cache: tokens/s and the peak
RSS of the process and of its map workers. Then `torchrun --nproc_per_node 2` trains a tiny model for
--steps steps on the prepared cache (CPU, gloo) under `/usr/bin/time`: the peak RSS of the largest process.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WIKITEXT2 = ROOT.parent / "shared" / "data" / "wikitext-2"
VOCAB = ROOT.parent / "shared" / "data" / "electra-vocab"
TINY = [
    "--model_size",
    "tiny",
    "--hidden_size",
    "64",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "2",
]
TINY += ["--intermediate_size", "128", "--embedding_size", "64"]


def build_corpus(scale: int, work_dir: Path) -> Path:
    """WikiText-2's articles (validation + test), shuffled and repeated `scale` times, in WikiText layout."""
    from pretrain_documents import ARTICLE_HEADING

    lines = []
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        lines += (WIKITEXT2 / name).read_text(encoding="utf-8").splitlines(keepends=True)
    articles, current = [], []
    for line in lines:
        if ARTICLE_HEADING.match(line.strip()) and current:
            articles.append("".join(current))
            current = []
        current.append(line)
    articles.append("".join(current))
    path = work_dir / f"wikitext2x{scale}.tokens"
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(scale):
            rng.shuffle(articles)
            handle.writelines(articles)
    return path


class PeakMemory:
    """Samples every process of a tree (a root and its children) every `interval` s: the largest resident
    set (RSS) and the largest anonymous part of it (RSS minus file-backed and shared pages: what the process
    itself holds, as opposed to the page cache of memory-mapped files it reads), in MiB, over all processes."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import threading

        import psutil  # installed with accelerate

        self.root, self.interval = psutil.Process(pid), interval
        self.rss = self.anon = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        import psutil

        while not self.stopped.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for process in processes:
                try:
                    info = process.memory_info()
                except psutil.Error:
                    continue
                self.rss = max(self.rss, info.rss >> 20)
                self.anon = max(self.anon, (info.rss - info.shared) >> 20)
            self.stopped.wait(self.interval)

    def stop(self) -> dict:
        self.stopped.set()
        self.thread.join()
        return {"peak_rss_mib": self.rss, "peak_anon_rss_mib": self.anon}


def trainer_flags(corpus: Path, cache: Path, workers: int) -> list[str]:
    return ["--train_file", str(corpus), "--tokenizer_name", str(VOCAB), "--data_cache_dir", str(cache),
            "--preprocessing_num_workers", str(workers), *TINY]  # fmt: skip


def prepare(argv: list[str]) -> dict:
    """In this process: the trainer's data preparation; its time, counts and peak RSS (MiB)."""
    import wikitext_trainer as wt
    from pretrain_data import describe_data_source, load_tokenizer, prepare_blocks

    args = wt.parse_args(argv)
    memory = PeakMemory(os.getpid())
    start = time.perf_counter()
    source = describe_data_source(args)
    blocks = prepare_blocks(args, load_tokenizer(args, source), source)
    seconds = time.perf_counter() - start
    stats = blocks["data_stats"]["train"]
    return {
        "seconds": round(seconds, 2),
        "tokens": stats["tokens"],
        "map_seconds": stats["preprocessing_seconds"],
        "tokens_per_second": round(stats["tokens"] / stats["preprocessing_seconds"]),
        "kept_fraction": stats["kept_fraction"],
        "examples": stats["examples"],
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "maxrss_workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        **memory.stop(),  # sampled: the largest RSS and anonymous RSS of this process or a worker
    }


def run_prepare(corpus: Path, cache: Path, workers: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, __file__, "--prepare", *trainer_flags(corpus, cache, workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_training(corpus: Path, cache: Path, steps: int, work_dir: Path) -> dict:
    """torchrun, 2 CPU processes, on the prepared cache: the largest process's peak RSS (GNU time, MiB)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = ["/usr/bin/time", "-f", "%M %e", str(torchrun), "--nproc_per_node", "2", "wikitext_trainer.py",
               *trainer_flags(corpus, cache, 1), "--max_training_steps", str(steps), "--batch_size", "8",
               "--warmup_steps", "2", "--eval_steps", str(steps), "--max_eval_blocks", "64",
               "--save_steps", str(10 * steps), "--model_save_directory", str(work_dir / "runs"),
               "--overwrite_output_dir"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    memory = PeakMemory(process.pid)
    _, stderr = process.communicate()
    sampled = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    peak_kib, seconds = stderr.strip().splitlines()[-1].split()
    return {"maxrss_mib": int(peak_kib) // 1024, "seconds": float(seconds), **sampled}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--prepare"]:
        print(json.dumps(prepare(argv[1:])))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="steps of the 2-process run (0: no run)")
    parser.add_argument("--work_dir", default="/tmp/bench-data")
    parser.add_argument("--output", default="bench/results/bench_data_cpu.json")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in args.scales:
        corpus = build_corpus(scale, work_dir)
        cache = work_dir / f"cache-x{scale}"
        for workers in args.workers:
            rows.append({"scale": scale, "workers": workers, "prepare": run_prepare(corpus, cache, workers)})
            print(json.dumps(rows[-1]), flush=True)
        if args.steps:
            rows[-1]["train_2_processes"] = run_training(corpus, cache, args.steps, work_dir)
            print(json.dumps(rows[-1]), flush=True)
    print(
        "| corpus | tokens | workers | prepare s | tokens/s | prepare: peak RSS / anonymous (MiB) | "
        "2-process run: peak RSS / anonymous (MiB) |"
    )
    print("| --- | --: | --: | --: | --: | --: | --: |")
    for row in rows:
        prep, train = row["prepare"], row.get("train_2_processes", {})
        print(
            f"| WikiText-2 x{row['scale']} | {prep['tokens']:,} | {row['workers']} | {prep['seconds']} | "
            f"{prep['tokens_per_second']:,} | {prep['peak_rss_mib']} / {prep['peak_anon_rss_mib']} | "
            f"{train.get('peak_rss_mib', '')} / {train.get('peak_anon_rss_mib', '')} |"
        )
    load = os.getloadavg()
    payload = {"rows": rows, "load_average": load, "command": " ".join(sys.argv), "nproc": os.cpu_count()}
    Path(args.output).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
