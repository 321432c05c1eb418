"""The job scripts on a real single-node Slurm cluster (tests/slurm_cluster.py), with tiny CPU settings.

One module fixture submits everything at once so the jobs overlap on the node: the pretraining array
(dense and 4-expert top-2), the GLUE array waiting on it with `--dependency=afterok`, a pretraining job
that is sent USR1 part-way, a two-process (srun + torchrun) job that is sent USR1 part-way, and a job
that fails for real. GPU requests are turned off with the documented override SBATCH_GPUS_PER_NODE=0.

The cluster needs root and apt (Debian's slurmctld, slurmd, slurm-client, munge, shellcheck are installed
when missing). Elsewhere these tests skip with the reason; with CI=true a skip is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster as slurm_cluster_module
from conftest import REPO_ROOT
from slurm_cluster import POLL_INTERVAL_S, SlurmCluster, SlurmUnavailable, ensure_packages

pytestmark = pytest.mark.slurm

PRETRAIN_SCRIPT = REPO_ROOT / "Electra_MoE_Pretrainer.sh"
GLUE_SCRIPT = REPO_ROOT / "Run_GLUE_Evaluation.sh"
SLURM_ENV = REPO_ROOT / "slurm_env.sh"
FIXTURES = Path(__file__).parent / "fixtures"
REQUEUE_EXIT_CODE = 75
USAGE_EXIT_CODE = 2
NUM_STEPS = 40
STUDY_TIMEOUT_S = 900
SIGNAL_AFTER_STEP = 2  # the first metrics line; signalled runs are then well short of NUM_STEPS
TINY_PRETRAIN_ARGS = [
    "--model_size", "tiny", "--max_seq_length", "32", "--batch_size", "4",
    "--max_training_steps", str(NUM_STEPS), "--logging_steps", "2",
    "--eval_steps", str(NUM_STEPS // 2), "--save_steps", str(NUM_STEPS // 2),
    "--train_file", str(FIXTURES / "wikitext" / "train.txt"),
    "--validation_file", str(FIXTURES / "wikitext" / "valid.txt"),
]  # fmt: skip
GLUE_TASKS = ["rte", "stsb"]
GLUE_SEED = "1"
TINY_GLUE_ARGS = [
    "--glue_dir", str(FIXTURES / "glue"), "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
]  # fmt: skip


def skip_or_fail(reason: str) -> None:
    """Skip with the reason, except on CI (CI=true), where a Slurm test that cannot run is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the Slurm tests, but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shell_tools() -> None:
    try:
        ensure_packages()
    except SlurmUnavailable as error:
        skip_or_fail(str(error))


@pytest.fixture(scope="session")
def slurm_cluster(shell_tools):
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmUnavailable as error:
        skip_or_fail(str(error))
    yield cluster
    cluster.stop()


def environment_args() -> tuple[list[str], dict[str, str]]:
    """The running interpreter's venv as the scripts' first argument, or PYTHON when it is no venv."""
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        return [sys.prefix], {}
    return [], {"PYTHON": sys.executable}


def run_script(script: Path, env: dict[str, str], *args: str, cwd: Path | None = None):
    """Run a job script outside Slurm (DRY_RUN or argument errors), with a clean SLURM_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    return subprocess.run(
        ["bash", str(script), *args], env={**base, **env}, capture_output=True, text=True, cwd=cwd
    )


# ---- static checks and argument handling (no cluster needed) -------------------------------------------


def test_missing_slurm_skips_with_the_reason_but_fails_on_ci(monkeypatch):
    monkeypatch.setattr(slurm_cluster_module, "missing_commands", lambda: ["sbatch"])
    monkeypatch.setattr(slurm_cluster_module.os, "geteuid", lambda: 1000)
    with pytest.raises(SlurmUnavailable, match="not root"):
        ensure_packages()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Slurm tests, but: no apt"):
        skip_or_fail("no apt")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no apt"):
        skip_or_fail("no apt")


@pytest.mark.parametrize("script", [PRETRAIN_SCRIPT, GLUE_SCRIPT, SLURM_ENV], ids=lambda p: p.name)
def test_scripts_pass_bash_n_and_shellcheck(script, shell_tools):
    for cmd in (
        ["bash", "-n", str(script)],
        ["shellcheck", "--severity=info", "--external-sources", str(script)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize(
    ("configs", "index", "message"),
    [("1:1 4:2", "2", "submit with --array=0-1"), ("8x2", "0", "'8x2' is not EXPERTS:ACTIVE"),
     ("1:1 from=/nonexistent", "1", "/nonexistent/config.json not found")],
)  # fmt: skip
def test_pretrainer_rejects_bad_configs(configs, index, message):
    env = {
        "CONFIGS": configs,
        "SLURM_ARRAY_TASK_ID": index,
        "PYTHON": sys.executable,
        "REPO_DIR": str(REPO_ROOT),
    }
    done = run_script(PRETRAIN_SCRIPT, env)
    assert done.returncode == USAGE_EXIT_CODE
    assert message in done.stderr


def test_pretrainer_default_array_has_eight_configurations_with_expert_choice_last():
    """Index 7 is expert choice (its own --router_type and run folder); sizes come only from the presets."""
    env = {"PYTHON": sys.executable, "REPO_DIR": str(REPO_ROOT), "DRY_RUN": "1"}
    commands = []
    for index in range(8):
        done = run_script(PRETRAIN_SCRIPT, {**env, "SLURM_ARRAY_TASK_ID": str(index)}, "--model_size", "tiny")
        assert done.returncode == 0, done.stderr
        commands.append(done.stdout.splitlines()[-1].split()[3:])
    assert "#SBATCH --array=0-7" in PRETRAIN_SCRIPT.read_text()
    assert [c for c in commands if "--router_type" in c] == [commands[7]]
    assert commands[7][commands[7].index("--router_type") + 1] == "expert_choice"
    bad = run_script(PRETRAIN_SCRIPT, {**env, "SLURM_ARRAY_TASK_ID": "8"})
    assert bad.returncode == USAGE_EXIT_CODE and "--array=0-7" in bad.stderr

    import wikitext_trainer

    names = {wikitext_trainer.parse_args(command).model_save_name for command in commands}
    assert len(names) == 8, names
    for script in (PRETRAIN_SCRIPT, GLUE_SCRIPT, SLURM_ENV):  # no model size table copied into a script
        assert not re.search(r"hidden_size|intermediate_size|num_hidden_layers|\b(256|768|1024|3072)\b",
                             script.read_text()), script.name  # fmt: skip


def test_pretrainer_passes_the_scaling_flags_through():
    """--sharding fsdp, --gradient_checkpointing and --compile reach the trainer unchanged (the multi-node
    launch with them: test_multi_node_launch_command)."""
    env = {"PYTHON": sys.executable, "REPO_DIR": str(REPO_ROOT), "DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "5"}
    scaling = ["--sharding", "fsdp", "--gradient_checkpointing", "--compile"]
    done = run_script(PRETRAIN_SCRIPT, env, "--model_size", "tiny", *scaling)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split()[-4:] == scaling


def test_pretrainer_continues_from_a_saved_model(tmp_path):
    """CONFIGS entry from=DIR: --init_discriminator_from DIR with its tokenizer, and no architecture flags
    (they would contradict the checkpoint); the entries beside it keep theirs."""
    saved = tmp_path / "upcycled"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    env = {
        "PYTHON": sys.executable,
        "REPO_DIR": str(REPO_ROOT),
        "DRY_RUN": "1",
        "CONFIGS": f"1:1 from={saved}",
    }
    commands = []
    for index in (0, 1):
        done = run_script(
            PRETRAIN_SCRIPT, {**env, "SLURM_ARRAY_TASK_ID": str(index)}, "--learning_rate", "1e-4"
        )
        assert done.returncode == 0, done.stderr
        commands.append(done.stdout.splitlines()[-1].split()[3:])
        assert (
            f"config {index} = " + ("1 experts, top-1" if index == 0 else f"continued from {saved}")
            in done.stdout
        )
    dense, continued = commands
    assert dense[:4] == ["--num_experts", "1", "--top_k", "1"] and "--init_discriminator_from" not in dense
    assert continued[:4] == ["--init_discriminator_from", str(saved), "--tokenizer_name", str(saved)]
    assert not {"--num_experts", "--top_k", "--router_type"} & set(continued)
    assert continued[-2:] == ["--learning_rate", "1e-4"]


def test_glue_grid_is_models_by_tasks_by_seeds(tmp_path):
    env = {"MODELS": "runs/a/discriminator hub/model-b", "TASKS": "rte stsb cola", "SEEDS": "1 2",
           "PYTHON": sys.executable, "REPO_DIR": str(REPO_ROOT), "DRY_RUN": "1",
           "SLURM_ARRAY_TASK_MAX": "11"}  # fmt: skip
    (tmp_path / "runs" / "a" / "discriminator").mkdir(parents=True)  # a local MODELS entry must exist
    seen = []
    for index in range(12):
        done = run_script(
            GLUE_SCRIPT, {**env, "SLURM_ARRAY_TASK_ID": str(index)}, "--glue_dir", "data", cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
        command = done.stdout.splitlines()[-1].split()
        value = {flag: command[command.index(flag) + 1] for flag in ("--model_name", "--task_name", "--seed")}
        assert command[-2:] == ["--glue_dir", "data"]
        seen.append((value["--model_name"], value["--task_name"], value["--seed"]))
    expected = [(m, t, s) for m in ("a", "model-b") for t in ("rte", "stsb", "cola") for s in ("1", "2")]
    assert seen == expected

    past = run_script(
        GLUE_SCRIPT, {**env, "SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MAX": "20"}, cwd=tmp_path
    )
    assert past.returncode == 0 and "nothing to do" in past.stdout
    short = run_script(
        GLUE_SCRIPT, {**env, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MAX": "5"}, cwd=tmp_path
    )
    assert short.returncode == USAGE_EXIT_CODE and "--array=6-11" in short.stderr


def test_glue_without_models_is_a_clear_error(tmp_path):
    env = {"PRETRAIN_DIR": str(tmp_path / "empty"), "PYTHON": sys.executable, "REPO_DIR": str(REPO_ROOT)}
    done = run_script(GLUE_SCRIPT, env)
    assert done.returncode == USAGE_EXIT_CODE and "set PRETRAIN_DIR or MODELS" in done.stderr


# ---- on the cluster --------------------------------------------------------------------------------------


def test_cluster_runs_a_trivial_job(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch(["--output", out, "--wrap", "srun hostname"], cwd=tmp_path)
    assert slurm_cluster.wait([job], timeout=60) == {job: "COMPLETED"}
    assert out.read_text().strip()


def test_multi_node_launch_command(slurm_cluster):
    """Two 4-GPU nodes: one torchrun per node via srun, rendezvous on the first node, port from the job id."""
    job_id = 123456
    env = {**slurm_cluster.env, "DRY_RUN": "1", "PYTHON": sys.executable, "REPO_DIR": str(REPO_ROOT),
           "SLURM_JOB_ID": str(job_id), "SLURM_ARRAY_JOB_ID": "123450", "SLURM_ARRAY_TASK_ID": "6",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_PER_TASK": "32"}  # fmt: skip
    scaling = ["--sharding", "fsdp", "--gradient_checkpointing"]
    done = subprocess.run(
        ["bash", str(PRETRAIN_SCRIPT), "--model_size", "small", *scaling],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    command = done.stdout.splitlines()[-1]
    assert command.endswith(" ".join(scaling))
    assert command.startswith("+ srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=32 ")
    port = 20000 + job_id % 20000
    for part in ("-m torch.distributed.run --nnodes=2 --nproc_per_node=4", f"--rdzv_endpoint=gpu07:{port}",
                 f"--rdzv_id={job_id}", "--num_experts 8 --top_k 2", "--resume_from_checkpoint auto",
                 "--model_size small"):  # fmt: skip
        assert part in command


def metrics_steps(run_dir: Path) -> list[tuple[int, str]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        steps.append((record["step"], record["split"]))
    return steps


@pytest.fixture(scope="module")
def study(slurm_cluster, tmp_path_factory, vocab_dir):
    """Submit every job at once, signal two of them part-way, wait for all; return ids and paths."""
    work = tmp_path_factory.mktemp("study")
    (work / "slurm_logs").mkdir()
    env_args, env_vars = environment_args()
    base = {**env_vars, "REPO_DIR": str(REPO_ROOT), "SBATCH_GPUS_PER_NODE": "0"}
    cluster = slurm_cluster
    pretrain_args = [*TINY_PRETRAIN_ARGS, "--tokenizer_name", str(vocab_dir)]

    def submit(script: Path, sbatch_args: list[str], env: dict[str, str], script_args: list[str]) -> str:
        return cluster.sbatch([*sbatch_args, script, *env_args, *script_args], env={**base, **env}, cwd=work)

    jobs = {
        "pretrain": submit(PRETRAIN_SCRIPT, ["--array=0-1", "--cpus-per-task=1"],
                           {"CONFIGS": "1:1 4:2"}, pretrain_args),
        "signalled": submit(PRETRAIN_SCRIPT, ["--array=0", "--cpus-per-task=1"],
                            {"CONFIGS": "4:2", "PRETRAIN_DIR": "outputs/signalled"}, pretrain_args),
        "failing": submit(PRETRAIN_SCRIPT, ["--array=0", "--cpus-per-task=1"],
                          {"CONFIGS": "1:1", "PRETRAIN_DIR": "outputs/failing"},
                          [*pretrain_args, "--train_file", str(work / "missing.txt")]),
        "ddp": submit(PRETRAIN_SCRIPT, ["--array=0", "--cpus-per-task=2"],
                      {"CONFIGS": "2:1", "PRETRAIN_DIR": "outputs/ddp", "NPROC_PER_NODE": "2"},
                      [*pretrain_args, "--batch_size", "2"]),
    }  # fmt: skip
    jobs["glue"] = submit(
        GLUE_SCRIPT,
        [
            f"--dependency=afterok:{jobs['pretrain']}",
            f"--array=0-{2 * len(GLUE_TASKS) - 1}",
            "--cpus-per-task=1",
        ],
        {"TASKS": " ".join(GLUE_TASKS), "SEEDS": GLUE_SEED, "GATHER": "1"},
        TINY_GLUE_ARGS,
    )

    to_signal = {
        f"{jobs['signalled']}_0": work / "outputs/signalled/electra-tiny-moe4-top2",
        f"{jobs['ddp']}_0": work / "outputs/ddp/electra-tiny-moe2-top1",
    }
    signal_steps = {}
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    while to_signal and time.monotonic() < deadline:
        for task, run_dir in list(to_signal.items()):
            steps = [step for step, split in metrics_steps(run_dir) if split == "train"]
            if steps and steps[-1] >= SIGNAL_AFTER_STEP:
                cluster.run(["scancel", "--batch", "--signal=USR1", task])
                signal_steps[task] = steps[-1]
                del to_signal[task]
            elif cluster.job_states(task).get(task) not in (None, "PENDING", "RUNNING"):
                pytest.fail(f"{task} ended before it could be signalled:\n{log_tails(work)}")
        time.sleep(POLL_INTERVAL_S)
    assert not to_signal, f"never reached step {SIGNAL_AFTER_STEP}: {to_signal}"
    states = cluster.wait(jobs.values(), timeout=max(deadline - time.monotonic(), 1))
    gather = cluster.run(
        ["squeue", "-h", "-t", "all", "--name=electra_moe_glue_gather", "-o", "%i"]
    ).stdout.split()
    assert len(gather) == 1, f"expected one gather job, found {gather}"
    states.update(cluster.wait(gather, timeout=max(deadline - time.monotonic(), 1)))
    return {"work": work, "jobs": jobs, "states": states, "gather": gather[0], "signal_steps": signal_steps}


def log_tails(work: Path, lines: int = 15) -> str:
    """The end of every job log, for failure messages."""
    return "\n".join(
        f"== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        for log in sorted((work / "slurm_logs").glob("*.out"))
    )


def log_of(study, job_key: str, index: int, name: str = "electra_moe_pretrain") -> str:
    return (study["work"] / "slurm_logs" / f"{name}_{study['jobs'][job_key]}_{index}.out").read_text()


def test_pretraining_array_trains_every_configuration(study, slurm_cluster):
    job = study["jobs"]["pretrain"]
    assert {k: v for k, v in study["states"].items() if k.startswith(f"{job}_")} == {
        f"{job}_0": "COMPLETED",
        f"{job}_1": "COMPLETED",
    }
    for index, (run_name, experts, top_k) in enumerate(
        [("electra-tiny", 1, 1), ("electra-tiny-moe4-top2", 4, 2)]
    ):
        run_dir = study["work"] / "outputs/pretrain" / run_name
        config = json.loads((run_dir / "discriminator" / "config.json").read_text())
        assert (config["num_experts"], config["top_k"]) == (experts, top_k)
        assert (run_dir / "generator" / "config.json").is_file()
        assert max(step for step, _ in metrics_steps(run_dir)) == NUM_STEPS
        assert f"config {index} = {experts} experts, top-{top_k}" in log_of(study, "pretrain", index)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_final_step(study, slurm_cluster):
    task = f"{study['jobs']['signalled']}_0"
    assert study["states"][task] == "COMPLETED"
    info = slurm_cluster.job_info(task)
    assert (info["Restarts"], info["ExitCode"]) == ("1", "0:0")
    log = log_of(study, "signalled", 0)
    assert "got SIGUSR1" in log and f"trainer exited with status {REQUEUE_EXIT_CODE}" in log
    assert f"requeueing {task}" in log and "(restart 1)" in log
    assert "Resumed from" in log
    signalled = study["work"] / "outputs/signalled/electra-tiny-moe4-top2"
    reference = study["work"] / "outputs/pretrain/electra-tiny-moe4-top2"
    # Interrupted part-way, yet the same logged steps and the same final step as the run left alone.
    assert study["signal_steps"][task] < NUM_STEPS
    assert metrics_steps(signalled) == metrics_steps(reference)
    assert max(step for step, _ in metrics_steps(signalled)) == NUM_STEPS
    # Same node, same seed: resuming restores weights, optimizer, RNG and data position exactly.
    from safetensors.torch import load_file

    weights = [load_file(run / "discriminator" / "model.safetensors") for run in (signalled, reference)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], msg=name)


def test_two_process_run_under_srun_and_torchrun_requeues(study, slurm_cluster):
    task = f"{study['jobs']['ddp']}_0"
    assert study["states"][task] == "COMPLETED"
    assert slurm_cluster.job_info(task)["Restarts"] == "1"
    run_dir = study["work"] / "outputs/ddp/electra-tiny-moe2-top1"
    assert json.loads((run_dir / "training_args.json").read_text())["num_processes"] == 2
    assert max(step for step, _ in metrics_steps(run_dir)) == NUM_STEPS
    log = log_of(study, "ddp", 0)
    assert "+ srun " in log and "torch.distributed.run" in log
    assert log.count("Stop signal received") == 2  # both ranks checkpointed together
    assert (run_dir / "discriminator" / "config.json").is_file()


def test_real_failure_is_not_requeued(study, slurm_cluster):
    task = f"{study['jobs']['failing']}_0"
    assert study["states"][task] == "FAILED"
    info = slurm_cluster.job_info(task)
    assert (info["Restarts"], info["ExitCode"]) == ("0", f"{USAGE_EXIT_CODE}:0")
    assert "requeueing" not in log_of(study, "failing", 0)


def test_glue_array_after_pretraining_writes_what_gather_reads(study, slurm_cluster):
    import gather_glue_results

    job = study["jobs"]["glue"]
    glue_states = {k: v for k, v in study["states"].items() if k.startswith(f"{job}_")}
    assert sorted(glue_states) == [f"{job}_{i}" for i in range(2 * len(GLUE_TASKS))]
    assert set(glue_states.values()) == {"COMPLETED"}
    glue_dir = study["work"] / "outputs/glue"
    for model in ("electra-tiny", "electra-tiny-moe4-top2"):
        for task in GLUE_TASKS:
            assert (glue_dir / model / task / f"seed_{GLUE_SEED}" / "eval_results.json").is_file()
    results, problems = gather_glue_results.collect(glue_dir)
    assert not problems and len(results) == 2 * len(GLUE_TASKS)

    assert study["states"][study["gather"]] == "COMPLETED"
    summary = (glue_dir / gather_glue_results.SUMMARY_CSV).read_text()
    assert "electra-tiny-moe4-top2" in summary
    gather_log = (study["work"] / "slurm_logs" / f"electra_moe_glue_gather_{study['gather']}.out").read_text()
    assert re.search(r"^\|\s*electra-tiny\s*\|", gather_log, re.MULTILINE), gather_log[-2000:]
