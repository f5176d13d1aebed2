# Two commands for a fresh machine with Python 3.11 and make:
#   make run    install into .venv and serve data/images on http://127.0.0.1:8000
#   make test   install into .venv (with dev tools), the system programs some tests drive
#               (build/system-deps.sh), and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1:8000

.PHONY: install run dev test lint fmt pyz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the runtime versions the .pyz ships (build/requirements.lock); dev tools float
$(VENV)/.installed: $(BIN)/python pyproject.toml build/requirements.lock
	$(BIN)/pip install --quiet -e '.[dev]' -c build/requirements.lock
	touch $@

install: $(VENV)/.installed

run: install
	IMAGE_PROXY_ROOT_PATH=data/images IMAGE_PROXY_BIND_ADDRESS=$(HOST) $(BIN)/python -m imgproxy

dev: install
	IMAGE_PROXY_ROOT_PATH=data/images $(BIN)/sanic imgproxy.app:create_app --factory --dev --host 127.0.0.1 --port 8000

# redis-server, chromium + chromedriver, promtool, djxl: installed with apt-get when missing and
# root (Debian), otherwise listed; their tests skip outside CI
test: install
	bash build/system-deps.sh
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

pyz: install
	bash build/shiv.sh

bench: install
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) imgproxy.pyz .pytest_cache .ruff_cache .mypy_cache
