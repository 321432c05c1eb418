# shellcheck shell=bash disable=SC2034  # python_bin and extra_args are read by the sourcing script
# Sourced by Electra_MoE_Pretrainer.sh and Run_GLUE_Evaluation.sh (sbatch runs a spooled copy of each, so
# they find this file through the repository directory, not their own path). Expects `die` and the
# script's arguments; activates the environment given as $1 (a conda env name or a venv directory, as the
# original scripts took it) or CONDA_ENV / VENV, shifts it off, and sets `python_bin` and `extra_args`.
# Defines `run_requeueable` (below), which both scripts run their Python process with.

activate_env() {
    local target=$1
    set +u  # activation scripts read unset variables
    if [[ -f $target/bin/activate ]]; then
        # shellcheck source=/dev/null
        source "$target/bin/activate"
    elif command -v conda >/dev/null; then
        eval "$(conda shell.bash hook)"
        conda activate "$target" || die "cannot activate conda environment '$target'"
    else
        die "'$target' is neither a virtual environment directory nor usable with conda (conda not found)"
    fi
    set -u
}

env_target=${CONDA_ENV:-${VENV:-}}
if [[ $# -gt 0 && $1 != -* ]]; then
    env_target=$1
    shift
fi
if [[ -n $env_target ]]; then
    activate_env "$env_target"
    python_bin=$(command -v python)
else
    python_bin=$(command -v "${PYTHON:-python3}") || die "no ${PYTHON:-python3} on PATH; give an environment"
fi
extra_args=("$@")

# ---- run_requeueable NAME TASK_ID COMMAND...: run COMMAND, forwarding USR1/TERM to it as USR1; exit status 75
# (checkpointed, run me again), or a non-zero exit after a forwarded signal, requeues TASK_ID under Slurm
# (at most MAX_REQUEUES times, default 50). Bash runs traps only while it waits on a background job. ----
readonly SLURM_REQUEUE_EXIT_CODE=75
readonly SLURM_DEFAULT_MAX_REQUEUES=50
signals=0
child=""
signalled=""
# shellcheck disable=SC2317  # called from the traps below
forward_stop_signal() {
    signals=$(( signals + 1 ))
    signalled=$1
    echo "[$(date '+%F %T')] got SIG$1: asking the $run_name to checkpoint and exit"
    # srun forwards USR1 to every task, whereas a TERM would make it kill them; our scripts take both.
    if [[ -n $child ]]; then
        kill -USR1 "$child" 2>/dev/null || true
    fi
}

run_requeueable() {
    run_name=$1
    local task=$2 status code seen restarts
    shift 2
    trap 'forward_stop_signal USR1' USR1
    trap 'forward_stop_signal TERM' TERM
    "$@" &
    child=$!
    while true; do
        seen=$signals
        status=0
        wait "$child" || status=$?
        (( signals == seen )) && break           # the child ended; status is its exit status
        kill -0 "$child" 2>/dev/null && continue  # a trap cut the wait short; the child still runs
        # The child ended around the signal: its saved status, unless the first wait already collected it.
        code=0
        wait "$child" 2>/dev/null || code=$?
        (( code == 127 )) || status=$code
        break
    done
    echo "[$(date '+%F %T')] $run_name exited with status $status"
    if (( status == SLURM_REQUEUE_EXIT_CODE )) || [[ -n $signalled && $status -ne 0 ]]; then
        if [[ -z ${SLURM_JOB_ID:-} ]]; then
            echo "not running under Slurm: rerun the same command to resume"
            exit "$status"
        fi
        restarts=${SLURM_RESTART_COUNT:-0}
        if (( restarts >= ${MAX_REQUEUES:-$SLURM_DEFAULT_MAX_REQUEUES} )); then
            echo "already requeued $restarts times (MAX_REQUEUES): not requeueing again" >&2
            exit "$status"
        fi
        echo "requeueing $task; the next run resumes from the latest checkpoint"
        scontrol requeue "$task"
        exit 0
    fi
    exit "$status"
}
