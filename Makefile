# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast fuzz test-triton bench ptq-models bench-gpu-dry accuracy accuracy-quick lint env clean-env

env: $(STAMP)

# Re-install only when the pinned requirements or the package metadata change. Triton (for the
# GPU kernels' interpreter tests; no dependencies, never touches torch) is part of the dev env.
$(STAMP): requirements-dev.txt requirements-triton.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -r requirements-triton.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The Triton tests run in their own process: TRITON_INTERPRET=1 must be set before triton is
# imported and stays set for the whole process.
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest tests src/deepshift --doctest-modules --ignore=tests/backends/test_triton.py
	TRITON_INTERPRET=1 $(PY) -m pytest tests/backends/test_triton.py

# The packed-file fuzz with 100,000 mutated files (the test suite runs 10,000); only
# PackedFormatError may escape load_packed. About five minutes.
fuzz: $(STAMP)
	DEEPSHIFT_FUZZ_EXAMPLES=100000 $(PY) -m pytest tests/formats/test_packed.py -k fuzz_only \
		--hypothesis-show-statistics

test-triton: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests/backends/test_triton.py

# Float vs DeepShift-Q vs DeepShift-PS (5-bit), paper's MNIST conv model, each with its default
# recipe (no tuning flag): on Fashion-MNIST (10,000 training images) when Debian's
# dataset-fashion-mnist is installed, else on scikit-learn's digits. A few minutes on 2 cores.
# Output folders in runs/demo/{float,q,ps}.
demo: $(STAMP)
	$(PY) -m deepshift compare --data auto --model mnist-conv --limit-train 10000 \
		--out runs/demo --overwrite --quiet

# The accuracy grid (float vs Q vs PS, bits 5..2, scratch / from float) on Fashion-MNIST:
# results/accuracy.md and .png. `make accuracy-quick` is a smoke check of under 10 minutes.
accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py --previous results/accuracy-previous.md

accuracy-quick: $(STAMP)
	$(PY) benchmarks/accuracy.py --quick

bench: $(STAMP)
	$(PY) benchmarks/kernels.py

# Third-party pretrained models (and Debian's fortunes, their text data) for benchmarks/ptq.py.
ptq-models: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-ptq.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-ptq-nodeps.txt
	test -d /usr/share/games/fortunes || apt-get install -y fortunes || \
		echo "install Debian's fortunes package for the minilm-l6 case"

# Runs every GPU benchmark case once on tiny CPU shapes through the Triton interpreter.
bench-gpu-dry: $(STAMP)
	$(PY) benchmarks/gpu.py --dry-run

# The code is formatted by hand to ruff's line length; `ruff format` would rewrite most files.
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean-env:
	rm -rf $(VENV)
