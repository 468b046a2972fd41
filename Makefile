# Two commands do all the set-up: `make demo` and `make test` (both install first).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export CMACLIP_HOME ?= $(CURDIR)/data

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

# torch and torchvision first and pinned: pip takes them from the local wheel cache; anything
# else would pull a multi-GB build. Everything else is pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip<27" setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e ".[airflow,test]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m pipeline.demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not services"

bench: install
	$(BIN)/python bench/forward.py --config tiny

clean:
	rm -rf $(VENV) data .pytest_cache
