# shellcheck shell=bash disable=SC2034  # python_bin and extra_args are read by the sourcing script
# Sourced by Electra_MoE_Pretrainer.sh and Run_GLUE_Evaluation.sh (sbatch runs a spooled copy of each, so
# they find this file through the repository directory, not their own path). Expects `die` and the
# script's arguments; activates the environment given as $1 (a conda env name or a venv directory, as the
# original scripts took it) or CONDA_ENV / VENV, shifts it off, and sets `python_bin` and `extra_args`.

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
