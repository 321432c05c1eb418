"""Bad input never costs a run (issue 18): the trainer run as a user runs it, in a subprocess, where the exit
status and the one-line message are the point.

One finished tiny run (checkpoints at steps 2, 4 and 6) is shared; most tests copy it without its final
models, which is the state a kill during the final save leaves, and resume it.
"""

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import run_state
import wikitext_trainer as wt
from conftest import REPO_ROOT
from pretrain_utils import assert_same_weights, final_weights, read_metrics, trainer_argv

TOTAL_STEPS = 6
# Noisy top-k routing draws random numbers in every MoE layer: a resume that loses the RNG state changes the
# weights, so "bit-identical to the uninterrupted run" also checks that the RNG states were restored.
RUN_FLAGS = [
    "--max_training_steps", str(TOTAL_STEPS), "--save_steps", "2", "--eval_steps", "3",
    "--num_experts", "2", "--top_k", "1", "--router_type", "noisy_topk", "--learning_rate", "2e-3",
]  # fmt: skip
ERROR_PREFIX = "wikitext_trainer.py: error: "


@pytest.fixture(scope="module")
def finished(tmp_path_factory, vocab_dir):
    """(run dir, data cache, final weights) of the uninterrupted run.

    A subprocess like the resumed runs it is compared with: in-process it would inherit torch's global state
    from conftest and earlier tests (the thread count a benchmark's main() sets), and another thread count
    reduces in another order, so the weights differed in their last bits when the whole suite ran.
    """
    root = tmp_path_factory.mktemp("finished")
    result = run_trainer(trainer_argv(root, vocab_dir, *RUN_FLAGS))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = root / "out" / "run"
    return run_dir, root / "cache", final_weights(run_dir)


@pytest.fixture
def argv(tmp_path, vocab_dir, finished):
    """The finished run's command line writing under this test's tmp_path (sharing its data cache)."""

    def make(*extra: str, name: str = "run") -> list[str]:
        return trainer_argv(tmp_path, vocab_dir, *RUN_FLAGS, *extra, name=name, cache=finished[1])

    return make


@pytest.fixture
def killed_in_final_save(tmp_path, finished):
    """A copy of the finished run without its final models: all checkpoints there, the run unfinished."""
    run_dir = tmp_path / "out" / "run"
    shutil.copytree(finished[0], run_dir, ignore=shutil.ignore_patterns("discriminator", "generator"))
    return run_dir


def run_trainer(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "wikitext_trainer.py"), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def usage_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The single `error:` line of a run that must stop with exit status 2 and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a digest of its content (to show nothing was written or deleted)."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def checkpoint_file(run_dir: Path, step: int, name: str) -> Path:
    return run_dir / "checkpoints" / f"checkpoint-{step}" / name


# --- 1. config errors surface before anything is created or deleted ------------------------------------


def test_an_invalid_model_shape_is_refused_before_the_run_folder_or_cache_is_created(argv, tmp_path):
    result = run_trainer(
        [*argv("--hidden_size", "30", "--num_attention_heads", "4"), "--data_cache_dir", str(tmp_path / "c")]
    )
    usage_error(result, "--hidden_size 30", "--num_attention_heads 4")
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_overwrite_with_an_invalid_config_keeps_the_finished_run(argv, tmp_path, finished):
    run_dir = tmp_path / "out" / "run"
    shutil.copytree(finished[0], run_dir)
    before = snapshot(run_dir)
    result = run_trainer(argv("--overwrite_output_dir", "--hidden_size", "30", "--num_attention_heads", "4"))
    usage_error(result, "--hidden_size 30")
    assert snapshot(run_dir) == before


# --- 2. a resume refuses changed run-defining flags, accepts cadence changes --------------------------


def test_resume_with_changed_run_defining_flags_is_refused_listing_each(argv, killed_in_final_save):
    before = snapshot(killed_in_final_save)
    changed = (
        "--num_experts",
        "4",
        "--batch_size",
        "4",
        "--learning_rate",
        "0.001",
        "--max_training_steps",
        "4",
    )
    result = run_trainer(argv(*changed, "--logging_steps", "2", "--resume_from_checkpoint", "auto"))
    error = usage_error(
        result,
        "--num_experts 2 -> 4",
        "--batch_size 8 -> 4",
        "--learning_rate 0.002 -> 0.001",
        "--max_training_steps 6 -> 4 (the step limit may only be raised)",
    )
    assert "--logging_steps" not in error and "--seed" not in error
    assert snapshot(killed_in_final_save) == before, "a refused resume must leave the run untouched"


def test_another_runs_checkpoint_is_compared_with_that_runs_record_too(argv, tmp_path, finished):
    """A folder started with 4 experts (killed before its first checkpoint) resumed from a 2-expert run's
    checkpoint: its own record matches the flags, the checkpoint's run's does not (issue 27: this loaded the
    checkpoint into the wrong shapes with a traceback and rewrote training_args.json)."""
    other = tmp_path / "out" / "other"
    other.mkdir(parents=True)
    record = json.loads((finished[0] / "training_args.json").read_text())
    (other / "training_args.json").write_text(
        json.dumps({**record, "num_experts": 4, "model_save_name": "other"})
    )
    before = snapshot(other)
    checkpoint = finished[0] / "checkpoints" / "checkpoint-2"
    result = run_trainer(
        argv("--num_experts", "4", "--resume_from_checkpoint", str(checkpoint), name="other")
    )
    usage_error(result, str((finished[0] / "training_args.json").resolve()), "--num_experts 2 -> 4")
    assert snapshot(other) == before


def test_a_run_recorded_before_the_schedule_and_format_flags_resumes_only_with_what_it_did(
    argv, killed_in_final_save
):
    """A record without --lr_schedule/--example_format was trained with the linear schedule on packed blocks:
    today's defaults (electra, electra) would switch both mid-run."""
    record = killed_in_final_save / "training_args.json"
    saved = json.loads(record.read_text())
    for key in ("lr_schedule", "example_format"):
        del saved[key]
    record.write_text(json.dumps(saved))
    result = run_trainer(argv("--resume_from_checkpoint", "auto"))
    usage_error(result, "--lr_schedule linear -> electra", "--example_format packed -> electra")


def test_resume_may_change_cadence_and_raise_the_step_limit(argv, killed_in_final_save):
    cadence = ("--logging_steps", "2", "--eval_steps", "4", "--save_steps", "1", "--save_total_limit", "4")
    cadence += ("--preprocessing_num_workers", "2", "--max_training_steps", "8")
    result = run_trainer(argv(*cadence, "--resume_from_checkpoint", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((killed_in_final_save / "training_args.json").read_text())
    assert (saved["max_training_steps"], saved["total_steps"], saved["eval_steps"]) == (8, 8, 4)
    assert [r["step"] for r in read_metrics(killed_in_final_save, "train")] == [1, 2, 3, 4, 5, 6, 8]
    assert [r["step"] for r in read_metrics(killed_in_final_save, "validation")] == [3, 6, 8]
    assert [step for step, _ in run_state.list_checkpoints(killed_in_final_save)] == [4, 6, 7, 8]


# --- 4. checkpoints carry a manifest; a corrupt one is skipped (auto) or named (explicit PATH) ----------


def test_each_checkpoint_has_a_manifest_of_sizes_and_checksums(finished):
    checkpoint = finished[0] / "checkpoints" / f"checkpoint-{TOTAL_STEPS}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    files = {p.name for p in checkpoint.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == files and {"pytorch_model.bin", "random_states_0.pkl"} <= files
    for name, entry in manifest["files"].items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    "name, keep_bytes, manifests",
    [("pytorch_model.bin", 1000, True), ("random_states_0.pkl", 0, True), ("random_states_0.pkl", 0, False)],
    ids=["truncated-model", "emptied-rng-state", "emptied-rng-state-in-a-checkpoint-without-manifest"],
)
def test_auto_resume_falls_back_past_a_corrupt_checkpoint_with_a_warning(
    argv, killed_in_final_save, finished, name, keep_bytes, manifests
):
    if not manifests:  # checkpoints written before manifests existed still resume, and are still checked
        for manifest in killed_in_final_save.glob("checkpoints/*/manifest.json"):
            manifest.unlink()
    corrupt = checkpoint_file(killed_in_final_save, TOTAL_STEPS, name)
    corrupt.write_bytes(corrupt.read_bytes()[:keep_bytes])
    result = run_trainer(argv("--resume_from_checkpoint", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and name in line]
    assert warnings and f"checkpoint-{TOTAL_STEPS}" in warnings[0] and "checkpoint-4" in warnings[0], (
        result.stderr[-3000:]
    )
    assert_same_weights(final_weights(killed_in_final_save), finished[2])
    set_aside = killed_in_final_save / "checkpoints" / f"corrupt-checkpoint-{TOTAL_STEPS}"
    assert (set_aside / name).stat().st_size == keep_bytes, "kept for inspection, out of rotation's way"


@pytest.mark.parametrize("name", ["optimizer.bin", "trainer_state.json"])
def test_an_explicit_checkpoint_that_fails_verification_is_an_error_naming_the_file(
    argv, killed_in_final_save, name
):
    corrupt = checkpoint_file(killed_in_final_save, TOTAL_STEPS, name)
    corrupt.write_bytes(corrupt.read_bytes()[:20])
    before = snapshot(killed_in_final_save)
    result = run_trainer(argv("--resume_from_checkpoint", str(corrupt.parent)))
    usage_error(result, str(corrupt))
    assert snapshot(killed_in_final_save) == before


# --- 5 and 8. metrics.jsonl and temporaries after a kill ----------------------------------------------


def test_a_truncated_last_metrics_line_is_dropped_with_a_warning(argv, killed_in_final_save):
    metrics = killed_in_final_save / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 7, "epoch": 0, "spl')  # a kill in the middle of a write
    result = run_trainer(argv("--resume_from_checkpoint", "auto", "--max_training_steps", "7"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("WARNING" in line and "metrics.jsonl" in line for line in result.stderr.splitlines())
    assert [r["step"] for r in read_metrics(killed_in_final_save, "train")] == list(range(1, 8))


def test_resuming_at_the_last_step_finishes_cleanly(argv, killed_in_final_save, finished):
    """No second final validation line, no stale temporary folder of the interrupted final save."""
    stale = killed_in_final_save / ".tmp-discriminator-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    result = run_trainer(argv("--resume_from_checkpoint", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(killed_in_final_save) == read_metrics(finished[0])
    assert not [p.name for p in killed_in_final_save.rglob("*tmp-*")]
    assert_same_weights(final_weights(killed_in_final_save), finished[2])


# --- 7. messages that name the path or flag ------------------------------------------------------------


@contextmanager
def read_only(directory: Path):
    """Make `directory` unwritable: chmod for a user, the immutable attribute for root (who ignores chmod)."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not available here")
        undo = ["chattr", "-i", str(directory)]
    else:
        directory.chmod(0o555)
        undo = ["chmod", "755", str(directory)]
    try:
        yield directory
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.parametrize("cache_inside", [False, True], ids=["own-cache", "default-cache"])
def test_a_read_only_output_directory_is_named(argv, tmp_path, cache_inside):
    with read_only(tmp_path / "readonly") as directory:
        extra = ["--model_save_directory", str(directory)]
        if cache_inside:
            extra += ["--data_cache_dir", str(directory / "data_cache")]
        result = run_trainer([*argv(), *extra])
    error = usage_error(result, f"--model_save_directory {directory}")
    assert "--train_file" not in error


@pytest.mark.parametrize(
    "save_steps, written", [("2", "checkpoints"), ("1000", "")], ids=["checkpoint", "final"]
)
def test_a_full_disk_names_what_could_not_be_written(argv, tmp_path, save_steps, written):
    def limit_file_size():  # every write past 100 kB fails, as on a full disk; a checkpoint or model is larger
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = run_trainer(argv("--save_steps", save_steps), preexec_fn=limit_file_size)
    run_dir = tmp_path / "out" / "run"
    error = usage_error(result, f"could not write {run_dir / written}".rstrip("/"), "disk")
    assert "inline_container" not in error
    assert not list(run_dir.rglob("*tmp-*")), "the partial save is removed"
    assert not (run_dir / "discriminator").exists()


@pytest.mark.parametrize(
    "make, fragments, not_in",
    [
        (lambda d: d / "missing" / "vocab", ["--tokenizer_name", "does not exist"], "Repo id"),
        (lambda d: (d / "empty").mkdir() or d / "empty", ["--tokenizer_name", "vocab.txt"], "sentencepiece"),
    ],
    ids=["missing-path", "no-vocabulary"],
)
def test_a_bad_tokenizer_path_is_named(argv, tmp_path, make, fragments, not_in):
    path = make(tmp_path)
    result = run_trainer([*argv(), "--tokenizer_name", str(path)])
    error = usage_error(result, str(path), *fragments)
    assert not_in not in error


def test_a_binary_train_file_is_named_as_not_text(argv, tmp_path):
    binary = tmp_path / "train.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    result = run_trainer([*argv(), "--train_file", str(binary), "--data_cache_dir", str(tmp_path / "c")])
    usage_error(result, f"--train_file {binary}", "UTF-8")


def test_a_text_column_that_holds_no_text_is_named(argv, tmp_path):
    data = tmp_path / "train.jsonl"
    line = json.dumps({"text": "the cat sat on the mat " * 8, "id": 3})
    data.write_text((line + "\n") * 50)
    files = ["--train_file", str(data), "--validation_file", str(data)]
    result = run_trainer(
        [*argv(), *files, "--data_cache_dir", str(tmp_path / "c"), "--text_column_name", "id"]
    )
    usage_error(result, "--text_column_name id", "int64")


# --- the main() wrapper: known errors become one line, bugs keep their traceback -------------------------


def test_main_reports_input_errors_in_one_line_and_lets_bugs_raise(monkeypatch, capsys, argv):
    def bad_input(args, stop, command=None):
        raise wt.InputError("--train_file x is broken")

    monkeypatch.setattr(wt, "pretrain", bad_input)
    with pytest.raises(SystemExit) as exit_info:
        wt.main(argv())
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ERROR_PREFIX + "--train_file x is broken"

    def bug(args, stop, command=None):
        raise ValueError("a bug")

    monkeypatch.setattr(wt, "pretrain", bug)
    with pytest.raises(ValueError, match="a bug"):
        wt.main(argv())
