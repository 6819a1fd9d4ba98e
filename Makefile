# sdqueue: `make run` starts the whole local stack, `make test` runs the suite.
# Both install what is missing first (Debian/Ubuntu, Python 3.11, root or sudo).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
# Elsewhere than this workplace, a CPU-only machine can take torch's CPU wheel with
#   make deps TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# `make fuzz`: schemathesis examples per API operation and mode (`make test` runs tests/test_fuzz.py with 12).
FUZZ_EXAMPLES ?= 200

# bash with pipefail: a failing command piped into grep fails the recipe, so a
# broken install is never stamped as installed.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: run test test-deps fuzz deps system-deps bench docker-config clean purge

run: deps
	$(PY) -m dev.localstack run

test: deps test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The fuzz alone, longer: every documented operation, no 5xx and JSON answers (tests/test_fuzz.py).
fuzz: deps
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest --timeout=1800 tests/test_fuzz.py $(PYTEST_ARGS)

deps: system-deps $(STAMP)

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt-get:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

# tests/test_playground.py drives the page in the system's Chromium (Playwright cannot download its own
# browser here); `make run` does not need it.
test-deps:
	@if [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null 2>&1; then \
	  echo "installing with apt-get: chromium (tests/test_playground.py)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; \
	fi

$(STAMP): requirements.txt requirements-api.txt requirements-dev.txt client/pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(if $(TORCH_INDEX),$(PY) -m pip install -q torch==2.13.0 --index-url $(TORCH_INDEX),)
	$(PY) -m pip install -q -r requirements-dev.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import torch, diffusers, flask_smorest, celery, boto3, sdqueue_client"
	touch $(STAMP)

bench: deps
	$(PY) -m bench.overhead
	$(PY) -m bench.ingest
	$(PY) -m bench.scale
	$(PY) -m bench.affinity
	$(PY) -m bench.redelivery
	$(PY) -m bench.batching
	$(PY) -m bench.streams
	$(PY) -m bench.previews
	$(PY) -m bench.training

docker-config:
	docker compose config --quiet && echo "docker-compose.yml is valid"

# clean keeps data/: it holds your models, the local API key and Redis's AOF.
clean:
	rm -rf $(VENV) .pytest_cache
	find . -path ./data -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# purge is clean plus data/ (models, API key, queued and finished tasks): all gone.
purge: clean
	rm -rf data
