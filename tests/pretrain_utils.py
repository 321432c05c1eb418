"""Command lines and readers shared by the `wikitext_trainer.py` tests: a tiny model on the fixture corpus."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "wikitext"
TRAIN_FILE = FIXTURE_DIR / "train.txt"
VALID_FILE = FIXTURE_DIR / "valid.txt"
TINY_MODEL = [
    "--model_size", "tiny", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
    "--intermediate_size", "64", "--embedding_size", "32",
]  # fmt: skip
SEQ_LEN = 32


def trainer_argv(
    root: Path, vocab_dir: Path, *extra: str, name: str = "run", cache: Path | None = None
) -> list[str]:
    """Flags for a tiny offline run writing under `root`; `extra` flags override the defaults."""
    return [
        "--train_file", str(TRAIN_FILE), "--validation_file", str(VALID_FILE),
        "--tokenizer_name", str(vocab_dir), *TINY_MODEL,
        "--max_seq_length", str(SEQ_LEN), "--batch_size", "8", "--preprocessing_num_workers", "1",
        "--warmup_steps", "2", "--logging_steps", "1",
        "--model_save_directory", str(root / "out"), "--model_save_name", name,
        "--data_cache_dir", str(cache or root / "cache"),
        *extra,
    ]  # fmt: skip


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if split is None or r["split"] == split]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every saved tensor of the finished run, keyed `discriminator/<name>` and `generator/<name>`."""
    weights = {}
    for part in ("discriminator", "generator"):
        for name, tensor in load_file(run_dir / part / "model.safetensors").items():
            weights[f"{part}/{name}"] = tensor
    return weights


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
