# Two commands for a newcomer (see README.md):
#   make serve   install everything, build the demo models if the repository is empty, serve them
#   make test    install everything, lint, type-check, and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPOSITORY ?= demo-models
PORT ?= 8001
METRICS_PORT ?= 8002
HOST ?= 127.0.0.1

.PHONY: install system-deps node-deps serve demo test lint bench protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the release these machines carry on disk; elsewhere pip downloads it.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[server,train,dev]'
	touch $@

# Node packages, each pinned by its package-lock.json; npm comes from .ci/system-deps.
# The root's is buf (make lint); examples/node's is the Node.js client the tests run.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

examples/node/node_modules/.installed: examples/node/package.json examples/node/package-lock.json
	npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
	touch $@

node-deps: node_modules/.installed examples/node/node_modules/.installed

install: $(VENV)/.installed

# Debian packages the tests drive for real (Prometheus, container tooling).
system-deps:
	bash .ci/system-deps

demo: install
	@if [ -z "$$(ls -A $(REPOSITORY) 2>/dev/null)" ]; then \
		$(BIN)/visionrpc train demo --repository $(REPOSITORY); fi

serve: demo
	$(BIN)/visionrpc serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

lint: install node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p visionrpc
	$(BIN)/mypy tests bench
	$(BIN)/hadolint --failure-threshold warning Dockerfile
	node_modules/.bin/buf lint

# system-deps first: node-deps and lint need npm on a clean machine.
test: system-deps install node-deps lint
	$(BIN)/pytest -q -ra

bench: install
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/overload_bench.py
	$(BIN)/python bench/train_bench.py

protos: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache node_modules examples/node/node_modules
