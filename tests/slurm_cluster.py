"""A real single-node Slurm cluster for tests: Debian's slurmctld/slurmd/munge as background daemons.

Everything lives in one temporary directory (config, munge key and socket, spool, state, logs,
pidfiles) and the daemons listen on free ports, so the cluster neither touches /etc/slurm nor
collides with another test run on the same machine. Client commands find it through the
`SLURM_CONF` variable in `SlurmCluster.env`. Facts behind the configuration are in
../shared/notes/slurm.md. Teardown stops each daemon by the pid in its pidfile, never by name.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "shellcheck")
REQUIRED_COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged", "shellcheck")
MUNGE_USER = "munge"
MUNGE_KEY_BYTES = 128  # munged accepts keys from 32 bytes; the Debian package generates 128
NODE_NAME = "localhost"
PARTITION = "debug"
DAEMON_START_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.5  # sbatch --wait polls much more slowly; squeue every 0.5 s keeps tests short
STOP_TIMEOUT_S = 15.0
CRED_EXPIRE_S = 5
APT_TIMEOUT_S = 600
# `slurmd -C` fields that describe the hardware; copied verbatim into the NodeName line.
NODE_HARDWARE_FIELDS = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
# Job states in which a job will never run again (squeue -o %T); anything else is still in flight.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the message says why)."""


def missing_commands() -> list[str]:
    return [name for name in REQUIRED_COMMANDS if shutil.which(name) is None]


def ensure_packages() -> None:
    """Install Debian's Slurm, munge and shellcheck when missing (root + apt only), else raise."""
    if not missing_commands():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"not root, cannot apt-get install {' '.join(APT_PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("apt-get not found (a Debian/Ubuntu machine is needed to install Slurm)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    if missing := missing_commands():
        raise SlurmUnavailable(f"still missing after apt-get install: {' '.join(missing)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_hardware() -> str:
    """The CPUs/RealMemory/... fields `slurmd -C` detects, so the node is never 'invalid'."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    return " ".join(f"{key}={fields[key]}" for key in NODE_HARDWARE_FIELDS if key in fields)


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlurmCluster:
    """One controller, one compute node (`localhost`), partition `debug`; `start()` then `stop()`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-test-"))
        # munged runs as the munge user and must reach its socket through every parent directory.
        self.root.chmod(0o755)
        self.munge_dir = self.root / "munge"
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.pidfiles = {
            "slurmd": self.root / "run" / "slurmd.pid",
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "munged": self.munge_dir / "munged.pid",
        }
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in list(self.env):
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
                del self.env[name]

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def start(self) -> SlurmCluster:
        ensure_packages()
        try:
            self._start_munge()
            self._write_config()
            self._start_daemon(["slurmctld", "-f", str(self.conf)], "slurmctld")
            self._start_daemon(["slurmd", "-f", str(self.conf), "-N", NODE_NAME], "slurmd")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam(MUNGE_USER)
        self.munge_dir.mkdir(mode=0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(MUNGE_KEY_BYTES))
        key.chmod(0o600)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        cmd = [
            "runuser", "-u", MUNGE_USER, "--", "munged",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.pidfiles['munged']}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]  # fmt: skip
        self._run_checked(cmd, "munged")
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while time.monotonic() < deadline:
            cred = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True)
            check = subprocess.run(
                ["unmunge", "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True
            )
            if cred.returncode == 0 and check.returncode == 0:
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"munged did not answer on {self.munge_socket}: {self._log_tail('munge')}")

    def _write_config(self) -> None:
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        lines = [
            "ClusterName=pytest",
            f"SlurmctldHost={NODE_NAME}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s); short keeps tests short.
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "EnforcePartLimits=ALL",
            "ReturnToService=2",
            # Finished jobs stay in squeue this long (default 300 s): the study fixture reads every state at the end.
            "MinJobAge=3600",
            # Schedule on every event and at least each second: jobs start in ~1 s instead of ~3 s.
            "SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,sched_interval=1",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.pidfiles['slurmctld']}",
            f"SlurmdPidFile={self.pidfiles['slurmd']}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _run_checked(self, cmd: Sequence[str], name: str) -> None:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmUnavailable(
                f"{name} failed to start ({done.returncode}): {done.stderr}{self._log_tail(name)}"
            )

    def _start_daemon(self, cmd: Sequence[str], name: str) -> None:
        self._run_checked(cmd, name)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while time.monotonic() < deadline:
            pid = _read_pid(self.pidfiles[name])
            if pid is not None and _alive(pid):
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{name} wrote no pidfile: {self._log_tail(name)}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            state = done.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"node not idle (sinfo: {state!r}): {self._log_tail('slurmd')}")

    def _log_tail(self, name: str, lines: int = 20) -> str:
        log = self.munge_dir / "munged.log" if name in ("munge", "munged") else self.log_dir / f"{name}.log"
        try:
            return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop slurmd, slurmctld and munged by their pidfiles (all at once), then remove the directory."""
        pids = [_read_pid(self.pidfiles[name]) for name in ("slurmd", "slurmctld", "munged")]
        pids = [pid for pid in pids if pid is not None and _alive(pid)]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- client helpers -------------------------------------------------------------------

    def run(
        self, cmd: Sequence[str], env: dict[str, str] | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (raises with its stderr on failure)."""
        done = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, **kwargs)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def sbatch(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit with `sbatch --parsable`; return the job id (for arrays, the array's job id)."""
        out = self.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job_states(self, job_id: str) -> dict[str, str]:
        """Map each job (array task ids as `A_i`) to its state; finished jobs stay visible for MinJobAge."""
        out = self.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i %T"]).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (Restarts, ExitCode, JobState, ...) of one job or array task."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))

    def wait(self, job_ids: Iterable[str], timeout: float) -> dict[str, str]:
        """Poll squeue until every job (and array task) is in a final state; return all states."""
        job_ids = list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            states: dict[str, str] = {}
            for job_id in job_ids:
                states.update(self.job_states(job_id))
            if states and all(state in FINAL_STATES for state in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {job_ids} not finished after {timeout:.0f} s: {states}")
            time.sleep(POLL_INTERVAL_S)
