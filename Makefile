# svertka — see README.md. Everything installs into the repo's own .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SVERTKA := $(VENV)/bin/svertka
MODELS ?= models
PYTEST_ARGS ?=

.PHONY: setup setup-serve system-deps model serve test test-fast test-unit lint proto bench bench-memory fuzz clean

## setup: a .venv in the repo with serving, training and test dependencies
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,train,dev]'
	touch $@

## system-deps: Debian packages the tests use (prometheus/promtool, libb64 for perf_analyzer)
system-deps:
	bash scripts/system-deps.sh

## model: the bundled default models (digits fp32 + int8); does nothing when present
model: setup
	$(SVERTKA) build-default --repository $(MODELS)

## serve: install, build the default model if absent, serve it
serve: model
	$(SVERTKA) serve --model-repository $(MODELS)

## proto: regenerate service/gen from proto/
proto: setup
	$(PY) -m service.protogen

## test: the whole suite (slow tests included); tritonclient tests run in their own process
test: setup system-deps model
	$(PY) -m pytest tests --ignore=tests/triton $(PYTEST_ARGS)
	$(PY) -m pytest tests/triton $(PYTEST_ARGS)

## test-fast: both tiers, without the tests marked slow
test-fast: setup
	$(PY) -m pytest tests --ignore=tests/triton -m "not slow" $(PYTEST_ARGS)
	$(PY) -m pytest tests/triton -m "not slow" $(PYTEST_ARGS)

## test-unit: the unit tier alone (fakes, the tiny model in process, no server started), without slow tests
test-unit: setup
	$(PY) -m pytest tests --ignore=tests/triton -m "not integration and not slow" $(PYTEST_ARGS)
	$(PY) -m pytest tests/triton -m "not integration and not slow" $(PYTEST_ARGS)

## bench: the serving benchmark -> docs/benchmarks.md + docs/img/benchmarks/ (about 30 min; installs the
## Triton peer into .bench/pytriton-venv). BENCH_QUICK=1: about a minute, digits models, no peer, report
## under .bench/quick/. Extra flags: BENCH_ARGS="--models resnet18 --no-peer" (see python -m bench --help)
BENCH_QUICK ?=
BENCH_ARGS ?=
bench: setup system-deps model
	$(PY) -m bench --default-models $(MODELS) $(if $(filter 1 yes true,$(BENCH_QUICK)),--quick) $(BENCH_ARGS)

## bench-memory: the server's memory per model (steady, under load, peak during a hot swap), one process and
## --frontends 2 -> .bench/memory/memory.{json,md}, the table docs/deploy.md sizes memory limits from (about
## 10 min; makes resnet18/50 with random weights in .bench/models once). Extra flags: BENCH_MEMORY_ARGS="--models
## digits --frontends 1" (see python -m bench.memory --help)
BENCH_MEMORY_ARGS ?=
bench-memory: setup model
	$(PY) -m bench.memory --default-models $(MODELS) $(BENCH_MEMORY_ARGS)

## fuzz: long fuzzing of image decoding and tensor request parsing: the hypothesis properties with
## FUZZ_EXAMPLES examples each, then atheris (coverage-guided) for FUZZ_SECONDS per target.
## Failing inputs: build/hypothesis (replayed first next time), build/fuzz/<target>/crash-*
FUZZ_EXAMPLES ?= 20000
FUZZ_SECONDS ?= 300
fuzz: setup
	SVERTKA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/reliability/test_fuzz.py --timeout=0 $(PYTEST_ARGS)
	$(PY) -m tests.reliability.fuzz_atheris decode -max_total_time=$(FUZZ_SECONDS)
	$(PY) -m tests.reliability.fuzz_atheris request -max_total_time=$(FUZZ_SECONDS)

lint: setup
	$(VENV)/bin/ruff check service export tests bench
	$(VENV)/bin/ruff format --check service export tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
