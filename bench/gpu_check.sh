#!/usr/bin/env bash
# Prove the CUDA path in one command on a lent GPU (docs/gpu.md): environment, `pytest -m cuda`, bench_moe,
# bench_pretrain, a pretraining run stopped with SIGUSR1 and resumed, GLUE SST-2 from it; everything under
# $OUT (default outputs/gpu_check), at most 8 files, within 8 minutes on one H200.
#
#   make gpu-kit DATA=../shared/data           # here, once: wheels into .whl/, data into .gpu_data/
#   bash bench/gpu_check.sh                    # there (the device tool's run, carry [".whl", ".gpu_data"])
#   bash bench/gpu_check.sh --cpu-dry-run      # here: the same steps at toy sizes on the CPU
#
# The GPU machine is offline and has no `datasets`: the wheels in .whl/ (if any) are installed first,
# offline and without dependencies, into a scratch folder put first on PYTHONPATH. Other arguments go to
# bench/gpu_check.py (--data, --budget_s, --out).
set -uo pipefail

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_dir" || exit 2
python_bin=${PYTHON:-python3}
dry_run=0
for arg in "$@"; do
    [[ $arg == --cpu-dry-run ]] && dry_run=1
done

shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if (( dry_run )); then
    echo "gpu_check: CPU dry run: the wheels in .whl/ are not installed (the current environment is used)"
elif (( ${#wheels[@]} > 0 )); then
    site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    echo "gpu_check: installing ${#wheels[@]} carried wheels into $site (offline, --no-deps)"
    if "$python_bin" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}"; then
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: warning: installing the wheels failed; going on with the machine's packages" >&2
    fi
else
    echo "gpu_check: no .whl/ wheels (make gpu-wheels): using the machine's packages"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$python_bin" bench/gpu_check.py --python "$python_bin" "$@"
