#!/usr/bin/env bash
#SBATCH --job-name=electra_moe_pretrain
#SBATCH --output=slurm_logs/%x_%A_%a.out
#SBATCH --open-mode=append
#SBATCH --array=0-7
#SBATCH --time=12:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# Pretrain the study's eight ELECTRA configurations with wikitext_trainer.py, one Slurm array task each:
# index 0 is the dense baseline, 1-6 are {2,4,8} experts x {1,2} active experts (token choice), 7 is 8 experts
# with expert-choice routing (capacity factor 2, the compute of top-2; top_k is ignored by that router).
# Model sizes come from wikitext_trainer.py's presets (--model_size tiny|small|base|large), not from here.
#
#   mkdir -p slurm_logs
#   sbatch Electra_MoE_Pretrainer.sh [CONDA_ENV | VENV_DIR] [wikitext_trainer.py arguments ...]
#   sbatch Electra_MoE_Pretrainer.sh electra_moe --model_size small --max_training_steps 1000000
#   sbatch --gpus-per-node=8 Electra_MoE_Pretrainer.sh electra_moe --model_size large --sharding fsdp \
#       --gradient_checkpointing --mixed_precision bf16     # larger than one GPU: docs/pretraining.md
#
# The defaults above ask for nothing site-specific. Override them on the sbatch command line, or with
# sbatch's own environment variables (the command line wins over the environment, which wins over the
# defaults above):
#   partition         sbatch -p NAME                 SBATCH_PARTITION=NAME
#   account           sbatch -A NAME                 SBATCH_ACCOUNT=NAME
#   time limit        sbatch -t 2-00:00:00           SBATCH_TIMELIMIT=2-00:00:00
#   GPUs per node     sbatch --gpus-per-node=l40:4   SBATCH_GPUS_PER_NODE=4    (0 = CPU only)
#   nodes             sbatch -N 2                    (one launcher per node, GPUs x nodes processes)
#   CPUs per node     sbatch --cpus-per-task=16
#   array indices     sbatch --array=0,3             (a subset of CONFIGS)
# Variables this script reads:
#   CONFIGS         "E:k[:ROUTER] ..." experts:active experts[:router type], one per array index (default
#                   below); ROUTER is a --router_type (softmax_topk, noisy_topk, expert_choice). An entry
#                   from=DIR continues pretraining from a saved ElectraMoE model instead (its architecture
#                   and tokenizer: --init_discriminator_from DIR --tokenizer_name DIR), e.g. a dense and an
#                   upcycled convert_bert_checkpoint.py output: CONFIGS="from=out/dense from=out/moe8"
#   CONDA_ENV       conda environment to activate when none is given as the first argument
#   VENV            virtual environment directory to activate instead (e.g. $PWD/.venv)
#   PYTHON          interpreter when nothing is activated (default: python3)
#   REPO_DIR        directory holding wikitext_trainer.py (default: the directory sbatch ran in)
#   PRETRAIN_DIR    --model_save_directory, read by Run_GLUE_Evaluation.sh (default: outputs/pretrain)
#   NPROC_PER_NODE  processes per node (default: the GPUs Slurm gave the node, at least 1)
#   MAX_REQUEUES    stop requeueing after this many restarts (default: 50)
#   DRY_RUN=1       print the command instead of running it
#
# Time limits and preemption: Slurm sends USR1 to this script 120 s before the time limit (B: = to the batch
# shell only); the script forwards it to the trainer, which checkpoints and exits with status 75. The script
# then requeues this array task, and the requeued run continues with `--resume_from_checkpoint auto`, so a
# run longer than the time limit simply spans several allocations. To preempt by hand:
#   scancel --batch --signal=USR1 <jobid>_<index>
# Any other non-zero exit is a real failure: the task ends non-zero and is not requeued.

set -euo pipefail

readonly DEFAULT_CONFIGS="1:1 2:1 2:2 4:1 4:2 8:1 8:2 8:2:expert_choice"
readonly REQUEUE_EXIT_CODE=75        # wikitext_trainer.py's "checkpointed, run me again" status
readonly USAGE_EXIT_CODE=2
readonly DEFAULT_MAX_REQUEUES=50
readonly RDZV_PORT_BASE=20000        # torchrun rendezvous port = base + job id modulo range
readonly RDZV_PORT_RANGE=20000

die() {
    echo "Electra_MoE_Pretrainer.sh: error: $*" >&2
    exit "$USAGE_EXIT_CODE"
}

# ---- environment: a conda env name or venv directory as $1 (shared with the other Slurm script) ----
repo_dir=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $repo_dir/slurm_env.sh ]] || die "$repo_dir/slurm_env.sh not found; submit from the repository or set REPO_DIR"
# shellcheck source-path=SCRIPTDIR source=slurm_env.sh
source "$repo_dir/slurm_env.sh"

trainer=$repo_dir/wikitext_trainer.py
[[ -f $trainer ]] || die "$trainer not found; submit from the repository or set REPO_DIR"

# The values wikitext_trainer.py would refuse, refused here before the job starts (its checks say why).
check_moe_entry() {
    local entry=$1 experts=$2 active=$3 router=$4
    (( experts >= 1 )) || die "CONFIGS entry '$entry': EXPERTS must be >= 1 (1 = the dense model)"
    (( active >= 1 && active <= experts )) || \
        die "CONFIGS entry '$entry': ACTIVE must lie in 1..EXPERTS ($experts)"
    (( experts > 1 || active == 1 )) || die "CONFIGS entry '$entry': the dense model (1 expert) is 1:1"
    [[ -z $router || $router =~ ^(softmax_topk|noisy_topk|expert_choice)$ ]] || \
        die "CONFIGS entry '$entry': ROUTER must be softmax_topk, noisy_topk or expert_choice"
    [[ $router != expert_choice || $active == 2 ]] || die "CONFIGS entry '$entry': expert_choice ignores" \
        "top_k (capacity factor 2, the compute of top-2); write $experts:2:expert_choice"
    (( experts > 1 )) || [[ -z $router ]] || die "CONFIGS entry '$entry': the dense model has no router"
}

# ---- this array task's configuration ----
read -ra configs <<< "${CONFIGS:-$DEFAULT_CONFIGS}"
index=${SLURM_ARRAY_TASK_ID:-0}
[[ $index =~ ^[0-9]+$ ]] || die "SLURM_ARRAY_TASK_ID '$index' is not an array index (0, 1, ...)"
if (( index >= ${#configs[@]} )); then
    die "array index $index but CONFIGS has ${#configs[@]} entries (${configs[*]});" \
        "submit with --array=0-$(( ${#configs[@]} - 1 ))"
fi
config=${configs[index]}
if [[ $config =~ ^from=(.+)$ ]]; then
    # Continued pretraining: the architecture and tokenizer are the saved model's (a later --tokenizer_name wins).
    init_dir=${BASH_REMATCH[1]}
    [[ -f $init_dir/config.json ]] || \
        die "CONFIGS entry '$config': $init_dir/config.json not found (from= takes a saved ElectraMoE model folder)"
    model_args=(--init_discriminator_from "$init_dir" --tokenizer_name "$init_dir")
    described="continued from $init_dir"
elif [[ $config =~ ^([0-9]+):([0-9]+)(:([a-z_]+))?$ ]]; then
    experts=$((10#${BASH_REMATCH[1]})) active=$((10#${BASH_REMATCH[2]})) router=${BASH_REMATCH[4]}
    check_moe_entry "$config" "$experts" "$active" "$router"
    model_args=(--num_experts "$experts" --top_k "$active")
    described="$experts experts, top-$active"
    if [[ -n $router ]]; then
        model_args+=(--router_type "$router")
        described+=", $router"
    fi
else
    die "CONFIGS entry '$config' is not EXPERTS:ACTIVE[:ROUTER] (e.g. 8:2 or 8:2:expert_choice) or from=DIR"
fi

train_args=(
    "${model_args[@]}"
    --model_save_directory "${PRETRAIN_DIR:-outputs/pretrain}"
    --resume_from_checkpoint auto
    "${extra_args[@]}"
)

# ---- launcher: plain python for one process; one torchrun per node under srun for more ----
gpus_on_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local devices
        IFS=, read -ra devices <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#devices[@]}"
    else
        echo 0
    fi
}
num_nodes=${SLURM_JOB_NUM_NODES:-1}
nproc_per_node=${NPROC_PER_NODE:-$(gpus_on_node)}
(( nproc_per_node >= 1 )) || nproc_per_node=1
# Share the node's allocated CPUs between its processes (torch would start a thread per core of the node).
cpus_per_node=${SLURM_CPUS_PER_TASK:-$(nproc)}
threads=$(( cpus_per_node / nproc_per_node ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 1 ? threads : 1 ))}

if (( num_nodes * nproc_per_node > 1 && $(gpus_on_node) == 0 )); then
    # Without this, accelerate on a CPU-only node treats each torchrun worker as a separate single-process
    # run (DistributedType.NO) instead of one gloo process group.
    export ACCELERATE_USE_CPU=1
fi
if (( num_nodes * nproc_per_node == 1 )); then
    launch=("$python_bin" "$trainer" "${train_args[@]}")
else
    nodelist=${SLURM_JOB_NODELIST:?multi-process runs need a Slurm allocation}
    mapfile -t hosts < <(scontrol show hostnames "$nodelist")
    rdzv_host=${hosts[0]:?cannot list the nodes of $nodelist}
    rdzv_port=$(( RDZV_PORT_BASE + SLURM_JOB_ID % RDZV_PORT_RANGE ))
    # torchrun itself must survive the USR1 meant for the trainers: an ignored signal stays ignored
    # across exec, and the trainers install their own handler.
    launch=(
        srun --nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1
        bash -c 'trap "" USR1; exec "$@"' torchrun
        "$python_bin" -m torch.distributed.run
        --nnodes="$num_nodes" --nproc_per_node="$nproc_per_node"
        --rdzv_backend=c10d --rdzv_endpoint="$rdzv_host:$rdzv_port" --rdzv_id="$SLURM_JOB_ID"
        "$trainer" "${train_args[@]}"
    )
fi

task_id=${SLURM_JOB_ID:-local}
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    task_id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
fi
echo "[$(date '+%F %T')] task $task_id (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname):" \
    "config $index = $described; $num_nodes node(s) x" \
    "$nproc_per_node process(es)"
printf '+'; printf ' %q' "${launch[@]}"; echo  # copy-pastable
if [[ ${DRY_RUN:-0} == 1 ]]; then
    exit 0
fi

# ---- run, forwarding USR1/TERM to the trainer (bash runs traps only while it waits on a background job) ----
signals=0
child=""
# shellcheck disable=SC2317  # called from the traps below
forward() {
    signals=$(( signals + 1 ))
    signalled=$1
    echo "[$(date '+%F %T')] got SIG$1: asking the trainer to checkpoint and exit"
    # srun forwards USR1 to every task, whereas a TERM would make it kill them; the trainer takes both.
    if [[ -n $child ]]; then
        kill -USR1 "$child" 2>/dev/null || true
    fi
}
signalled=""
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${launch[@]}" &
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
echo "[$(date '+%F %T')] trainer exited with status $status"

if (( status == REQUEUE_EXIT_CODE )) || [[ -n $signalled && $status -ne 0 ]]; then
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        echo "not running under Slurm: rerun the same command to resume"
        exit "$status"
    fi
    restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts >= ${MAX_REQUEUES:-$DEFAULT_MAX_REQUEUES} )); then
        echo "already requeued $restarts times (MAX_REQUEUES): not requeueing again" >&2
        exit "$status"
    fi
    echo "requeueing $task_id; the next run resumes from the latest checkpoint"
    scontrol requeue "$task_id"
    exit 0
fi
exit "$status"
