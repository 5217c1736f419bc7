# The two commands of the quick start: `make run` and `make test`.
# Only Python 3.11+ is needed: everything else is installed into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-docker docker-matrix lint bench chaos clean

run: $(STAMP)
	@mkdir -p var/log
	$(BIN)/forwarder run --config config/forwarder.dev.toml

test: $(STAMP)
	$(BIN)/pytest

# The tests against a real private dockerd (tests/dockerd.py): installs docker.io,
# busybox-static and debootstrap first (.ci/install-docker). dockerd needs root, so
# pytest runs as root (through sudo when you are not).
test-docker: $(STAMP)
	bash .ci/install-docker
	FORWARDER_REQUIRE_DOCKER=1 $(if $(filter 0,$(shell id -u)),,sudo -E) $(BIN)/pytest -m docker

# The container matrix of issue 11 at full size (files and api mode against the real
# dockerd: more lines, 10 s of downtime); `make test` runs every cell at a small size.
docker-matrix: $(STAMP)
	bash .ci/install-docker
	FORWARDER_REQUIRE_DOCKER=1 FORWARDER_DOCKER_MATRIX=full \
		$(if $(filter 0,$(shell id -u)),,sudo -E) $(BIN)/pytest -m docker -v -s

lint: $(STAMP)
	$(BIN)/ruff check forwarder tests

# The throughput and memory benchmark (not a test): forwarder vs raw COPY, same run.
bench: $(STAMP)
	$(BIN)/python -m tests.perf.file_to_pg --lines 1000000

# The chaos suite at full size (CI runs a small one inside `make test`).
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.run --minutes 3 --writers 4 --files 4 --http-clients 8

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "forwarder needs Python 3.11 or newer; this is " + sys.version.split()[0] + " (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) .forwarder var .pytest_cache
