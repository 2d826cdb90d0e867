# moepatch: `make demo` installs and runs the demo; `make test` installs and runs the tests.
# Every target uses the interpreter it is started with ($(PYTHON)): a venv, a conda env or the system one.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
SHELL := /bin/bash
# Offline by construction: a stray hub call fails at once instead of hanging.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore
# TRITON_INTERPRET must be set before triton is first imported: the kernels run on the CPU.
# One pytest worker per core, at most 4 (each imports torch and transformers): 2 on CI's 2 cores.
JOBS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
PYTEST := TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -n $(JOBS)
# The version-sensitive suites (patching, the experts registry, expert parallelism, ScMoE) that
# also run on transformers 5.17, the GPU image's release and the oldest in the declared range.
TF517_TESTS := tests/patch tests/ops/test_backend.py tests/parallel tests/scmoe tests/test_versions.py tests/test_tiny.py
LOGS := out/tests

.PHONY: install install-dev demo test test-main test-tf517 test-latest constraints lint

# torch first, and only when missing: `torch==2.13.0` is the CPU build on this machine's disk, while a
# bare `torch` requirement would resolve to a multi-GB CUDA build.  An existing torch is kept, with
# what it requires (.ci/testenv.py pins drops those pins); everything else is pinned by constraints.txt.
# `install` takes what the package uses; the tests add the `dev` extra, `make lint` the `lint` one.
EXTRAS ?=
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q -c constraints.txt torch==2.13.0
	@$(PYTHON) .ci/testenv.py pins constraints.txt .cache/constraints.txt
	$(PIP) install -q -c .cache/constraints.txt -e ".$(EXTRAS)"
	$(PYTHON) -m moepatch.cli install-lm-eval-plugin

install-dev:
	@$(MAKE) --no-print-directory install EXTRAS=[dev]

demo: install
	$(PYTHON) -m moepatch.cli eval --limit 100 --capacity-factor 1.0,1.5 --strategy drop,reroute,expanded \
		--policy score --output out/demo

# Both runs always execute; the summary shows both, and the target fails if either failed.
test: install-dev
	@mkdir -p $(LOGS); rc=0; \
	$(MAKE) --no-print-directory test-main 2>&1 | tee $(LOGS)/main.log; (( PIPESTATUS[0] == 0 )) || rc=1; \
	$(MAKE) --no-print-directory test-tf517 2>&1 | tee $(LOGS)/tf517.log; (( PIPESTATUS[0] == 0 )) || rc=1; \
	echo "== make test summary"; \
	echo "transformers $$($(PYTHON) -c 'import transformers as t; print(t.__version__)'), whole suite: $$(grep -E '(passed|failed|error)' $(LOGS)/main.log | tail -n 1)"; \
	echo "transformers 5.17.0, $(TF517_TESTS): $$(grep -E '(passed|failed|error)' $(LOGS)/tf517.log | tail -n 1)"; \
	exit $$rc

test-main:
	$(PYTEST)

# transformers 5.17 and the huggingface-hub it needs go to a side path (.tf517) that shadows the
# interpreter's own releases, so this works wherever `make test` runs; pinned by constraints-tf517.txt.
test-tf517:
	@$(PYTHON) .ci/testenv.py side .tf517 -c constraints-tf517.txt transformers==5.17.0
	PYTHONPATH=$(CURDIR)/.tf517$${PYTHONPATH:+:$$PYTHONPATH} $(PYTEST) $(TF517_TESTS)

# The whole suite against the newest release of every dependency (no constraints, no upper bounds;
# torch stays the installed one).  Run it before widening pyproject.toml's ranges; then `make constraints`.
test-latest: install-dev
	@$(PYTHON) .ci/testenv.py side .latest --eager $$($(PYTHON) .ci/testenv.py latest-requirements)
	@PYTHONPATH=$(CURDIR)/.latest $(PYTHON) -c "import importlib.metadata as m; \
		print('newest releases:', ', '.join(f'{n} {m.version(n)}' for n in ('transformers', 'torch', 'lm_eval', 'accelerate', 'datasets', 'triton')))"
	PYTHONPATH=$(CURDIR)/.latest$${PYTHONPATH:+:$$PYTHONPATH} $(PYTEST)

# Rewrite constraints.txt from a fresh venv's resolution of `.[dev,lint]` (run after test-latest passed).
constraints:
	rm -rf .cache/venv-constraints && $(PYTHON) -m venv .cache/venv-constraints
	.cache/venv-constraints/bin/pip install -q torch==2.13.0 && .cache/venv-constraints/bin/pip install -q -e ".[dev,lint]"
	{ sed -n '1,2p' constraints.txt; .cache/venv-constraints/bin/pip freeze --exclude-editable | \
		sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > .cache/constraints.new && mv .cache/constraints.new constraints.txt

lint:
	@$(MAKE) --no-print-directory install EXTRAS=[lint]
	$(PYTHON) -m ruff check moepatch tests scripts recipes
