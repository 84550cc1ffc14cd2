# The set-up commands of the README. Each creates .venv and installs what it needs on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-campaign clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/embedpipe demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-campaign: $(STAMP)  # every case of the fault campaigns (the suite runs one of each)
	EMBEDPIPE_CAMPAIGN=1 $(BIN)/python -m pytest -q tests/faults tests/embedding/test_embed.py tests/model/test_micro_batch.py tests/test_slurm.py

clean:
	rm -rf $(VENV) demo-out
