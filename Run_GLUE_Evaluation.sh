#!/usr/bin/env bash
#SBATCH --job-name=electra_moe_glue
#SBATCH --output=slurm_logs/%x_%A_%a.out
#SBATCH --open-mode=append
#SBATCH --array=0-71
#SBATCH --time=08:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --gpus-per-node=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# Fine-tune and evaluate every pretrained model on every GLUE task with run_glue.py: one Slurm array task
# per (model, task, seed), models outermost. The default array 0-71 covers the study: 8 models x 9 tasks
# x 1 seed. Results land in run_glue.py's layout, <GLUE_OUTPUT_DIR>/<model>/<task>/seed_<seed>/, which
# gather_glue_results.py reads.
#
#   mkdir -p slurm_logs
#   sbatch --dependency=afterok:<pretraining job id> Run_GLUE_Evaluation.sh [CONDA_ENV | VENV_DIR] \
#       [run_glue.py arguments ...]
#
# The model list is read when each task starts, so the job can wait on the pretraining job. An index past
# the end of the (model, task, seed) grid has nothing to do and exits 0; the last index of an array that is
# too short for the grid fails and names the --array range still to submit. A run whose eval_results.json
# exists is skipped, so resubmitting the same command fills in only what failed.
#
# Time limits and preemption, as for Electra_MoE_Pretrainer.sh: Slurm sends USR1 to this script 120 s before
# the time limit; it is forwarded to run_glue.py, which saves a Trainer checkpoint in the run folder and
# exits with status 75; the script then requeues this array task, and run_glue.py resumes from that
# checkpoint. To preempt by hand: scancel --batch --signal=USR1 <jobid>_<index>
#
# Site settings, as for Electra_MoE_Pretrainer.sh (the command line wins over the environment):
#   partition      sbatch -p NAME                 SBATCH_PARTITION=NAME
#   account        sbatch -A NAME                 SBATCH_ACCOUNT=NAME
#   time limit     sbatch -t 4:00:00              SBATCH_TIMELIMIT=4:00:00
#   GPUs per node  sbatch --gpus-per-node=0       SBATCH_GPUS_PER_NODE=0    (0 = CPU only)
#   CPUs           sbatch --cpus-per-task=8
#   grid size      sbatch --array=0-215           (e.g. for SEEDS="1 2 3")
# Variables this script reads:
#   MODELS           checkpoints to evaluate, space-separated (pretraining run dirs, their discriminator/
#                    folders, or Hub ids); default: every <PRETRAIN_DIR>/*/discriminator
#   PRETRAIN_DIR     where Electra_MoE_Pretrainer.sh wrote its runs (default: outputs/pretrain)
#   TASKS            GLUE tasks (default: cola sst2 mrpc stsb qqp mnli qnli rte wnli)
#   SEEDS            fine-tuning seeds (default: 42)
#   GLUE_OUTPUT_DIR  run_glue.py --output_dir (default: outputs/glue)
#   GATHER=1         also submit a job that runs gather_glue_results.py once the whole array has ended
#   OVERWRITE=1      rerun and replace existing results instead of skipping them
#   MAX_REQUEUES     stop requeueing after this many restarts (default: 50)
#   CONDA_ENV, VENV, PYTHON, REPO_DIR, DRY_RUN=1     as for Electra_MoE_Pretrainer.sh

set -euo pipefail

readonly DEFAULT_TASKS="cola sst2 mrpc stsb qqp mnli qnli rte wnli"
readonly DEFAULT_SEEDS="42"
readonly USAGE_EXIT_CODE=2
readonly GATHER_TIME_LIMIT=00:30:00

die() {
    echo "Run_GLUE_Evaluation.sh: error: $*" >&2
    exit "$USAGE_EXIT_CODE"
}

# ---- environment: a conda env name or venv directory as $1 (shared with the other Slurm script) ----
repo_dir=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $repo_dir/slurm_env.sh ]] || die "$repo_dir/slurm_env.sh not found; submit from the repository or set REPO_DIR"
# shellcheck source-path=SCRIPTDIR source=slurm_env.sh
source "$repo_dir/slurm_env.sh"

[[ -f $repo_dir/run_glue.py ]] || \
    die "$repo_dir/run_glue.py not found; submit from the repository or set REPO_DIR"
output_dir=${GLUE_OUTPUT_DIR:-outputs/glue}
pretrain_dir=${PRETRAIN_DIR:-outputs/pretrain}

# ---- the (model, task, seed) grid, read now: the pretraining runs may have finished only just ----
if [[ -n ${MODELS:-} ]]; then
    read -ra models <<< "$MODELS"
else
    shopt -s nullglob
    models=("$pretrain_dir"/*/discriminator)
    shopt -u nullglob
    (( ${#models[@]} > 0 )) || die "no $pretrain_dir/*/discriminator found; set PRETRAIN_DIR or MODELS"
fi
read -ra tasks <<< "${TASKS:-$DEFAULT_TASKS}"
read -ra seeds <<< "${SEEDS:-$DEFAULT_SEEDS}"
(( ${#tasks[@]} > 0 && ${#seeds[@]} > 0 )) || die "TASKS and SEEDS must not be empty"
# Checked here, before the grid is counted, so a typo is named instead of failing one array task later.
for model in "${models[@]}"; do
    if [[ ! -e $model && ( $model == /* || $model == .* || $model == ~* || $model == */*/* ) ]]; then
        die "MODELS entry '$model' does not exist; pass pretraining run folders, their discriminator/ or Hub ids"
    fi
done
for task in "${tasks[@]}"; do
    [[ " $DEFAULT_TASKS " == *" $task "* ]] || die "TASKS entry '$task' is not a GLUE task ($DEFAULT_TASKS)"
done
[[ $(printf '%s\n' "${tasks[@]}" | sort | uniq -d) == "" ]] || die "TASKS lists a task twice: ${tasks[*]}"
for i in "${!seeds[@]}"; do
    [[ ${seeds[i]} =~ ^[0-9]+$ ]] || die "SEEDS entry '${seeds[i]}' is not a non-negative integer"
    seeds[i]=$(( 10#${seeds[i]} ))  # 01 is seed 1, as run_glue.py reads it
done
duplicate_seeds=$(printf '%s\n' "${seeds[@]}" | sort -n | uniq -d | tr '\n' ' ')
[[ -z $duplicate_seeds ]] || die "SEEDS lists ${duplicate_seeds% } more than once; each (model, task, seed) is one run"
grid_size=$(( ${#models[@]} * ${#tasks[@]} * ${#seeds[@]} ))

index=${SLURM_ARRAY_TASK_ID:-0}
[[ $index =~ ^[0-9]+$ ]] || die "SLURM_ARRAY_TASK_ID '$index' is not an array index (0, 1, ...)"
array_max=${SLURM_ARRAY_TASK_MAX:-$index}

if [[ ${GATHER:-0} == 1 && -n ${SLURM_ARRAY_JOB_ID:-} && $index == "${SLURM_ARRAY_TASK_MIN:-0}" \
      && ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    gather_cmd=$(printf '%q ' "$python_bin" "$repo_dir/gather_glue_results.py" "$output_dir" \
        --format markdown)
    gather_job=$(sbatch --parsable --dependency="afterany:$SLURM_ARRAY_JOB_ID" \
        --job-name=electra_moe_glue_gather --output="slurm_logs/%x_%j.out" --time="$GATHER_TIME_LIMIT" \
        --nodes=1 --ntasks=1 --cpus-per-task=1 --gpus-per-node=0 \
        ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} \
        ${SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"} --wrap="$gather_cmd")
    echo "submitted gather job $gather_job (runs after array $SLURM_ARRAY_JOB_ID ends)"
fi

if (( index >= grid_size )); then
    echo "index $index is past the grid of $grid_size runs (${#models[@]} models x ${#tasks[@]} tasks x" \
        "${#seeds[@]} seeds): nothing to do"
    exit 0
fi
if (( index == array_max && grid_size > array_max + 1 )); then
    die "the grid has $grid_size runs but the array stops at $array_max:" \
        "also submit --array=$(( array_max + 1 ))-$(( grid_size - 1 ))"
fi

per_model=$(( ${#tasks[@]} * ${#seeds[@]} ))
model=${models[index / per_model]}
task=${tasks[(index % per_model) / ${#seeds[@]}]}
seed=${seeds[index % ${#seeds[@]}]}
# Results folder name as run_glue.py derives it: the run's name for <run>/discriminator, else the last part.
model_dir=${model%/}
if [[ $(basename "$model_dir") == discriminator ]]; then
    model_name=$(basename "$(dirname "$model_dir")")
else
    model_name=$(basename "$model_dir")
fi
run_dir=$output_dir/$model_name/$task/seed_$seed

glue_args=(
    --model_name_or_path "$model" --model_name "$model_name" --task_name "$task" --seed "$seed"
    --do_train --do_eval --output_dir "$output_dir"
)
if [[ ${OVERWRITE:-0} == 1 && ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    glue_args+=(--overwrite_output_dir)  # a requeued task resumes what its first start began
elif [[ -f $run_dir/eval_results.json ]]; then
    echo "$run_dir/eval_results.json exists: skipping (OVERWRITE=1 reruns it)"
    exit 0
fi
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
launch=("$python_bin" "$repo_dir/run_glue.py" "${glue_args[@]}" "${extra_args[@]}")

task_id=${SLURM_JOB_ID:-local}
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    task_id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
fi
echo "[$(date '+%F %T')] task $task_id (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname):" \
    "$model_name / $task / seed $seed"
printf '+'; printf ' %q' "${launch[@]}"; echo  # copy-pastable
if [[ ${DRY_RUN:-0} == 1 ]]; then
    exit 0
fi
# Forwarding USR1/TERM to run_glue.py and requeueing on its status 75 (slurm_env.sh).
run_requeueable run_glue.py "$task_id" "${launch[@]}"
