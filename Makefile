# Facecast: `make run` installs everything and starts the server; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_TEST_PACKAGES := espeak-ng chromium nginx libnginx-mod-rtmp nats-server

.PHONY: run install install-dev system-test-deps test bench clean

# Every install takes the versions CI tested (constraints.txt), so a fresh machine gets the same set.
CONSTRAINTS := -c constraints.txt

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(CONSTRAINTS) --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install $(CONSTRAINTS) -e .

install-dev: $(BIN)/python
	$(BIN)/pip install $(CONSTRAINTS) -e '.[dev]'

run: install
	$(BIN)/facecast serve

system-test-deps:
	@missing=""; for p in $(APT_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

test: install-dev system-test-deps
	$(BIN)/pytest -ra

bench: install
	$(BIN)/facecast bench turn

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
