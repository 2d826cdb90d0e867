# moepatch: `make demo` installs and runs the demo; `make test` installs and runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TF517 := .venv-tf517
# Offline by construction: a stray hub call fails at once instead of hanging.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-main test-tf517 lint

# torch first, and only when missing: `torch==2.13.0` is the CPU build on this machine's disk, while a
# bare `torch` requirement would resolve to a multi-GB CUDA build.  An existing torch is kept.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PYTHON) -m moepatch.cli install-lm-eval-plugin

demo: install
	$(PYTHON) -m moepatch.cli eval --limit 100 --capacity-factor 1.0,1.5 --output out/demo

test: install test-main test-tf517

# TRITON_INTERPRET must be set before triton is first imported: the kernels run on the CPU.
test-main:
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q

# The GPU image has transformers 5.17 while PyPI is newer: the version-sensitive tests (patching,
# the experts registry, expert parallelism, ScMoE conversion) run against both.  The venv
# sees the main site-packages and adds only transformers 5.17 and the huggingface-hub 1.x it needs.
test-tf517:
	@test -x $(TF517)/bin/python || $(PYTHON) -m venv --system-site-packages $(TF517)
	@$(TF517)/bin/python -c "import transformers as t; assert t.__version__ == '5.17.0'" 2>/dev/null || \
		$(TF517)/bin/pip install -q "transformers==5.17.0" "huggingface-hub>=1.5,<2"
	TRITON_INTERPRET=1 PYTHONPATH=$(CURDIR) $(TF517)/bin/python -m pytest -q tests/patch tests/ops/test_integration.py \
		tests/parallel tests/scmoe

lint:
	$(PYTHON) -m ruff check moepatch tests scripts recipes
