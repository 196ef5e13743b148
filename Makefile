# Two commands for a fresh machine: `make run` and `make test`. Everything they need is installed here,
# exactly as pinned (with hashes) in requirements/*.txt; `make lock` refreshes those pins (docs/development.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
STAMP_RUN := $(VENV)/.keel-run-installed
STAMP_TEST := $(VENV)/.keel-test-installed
LOCK_RUN := requirements/run.txt
LOCK_DEV := requirements/dev.txt
LOCK_BUILD := requirements/build.txt

# llama.cpp is compiled for a baseline every machine of the architecture has, never for the build
# machine's own CPU (-march=native crashes on another CPU). x86-64: AVX2/FMA/F16C (every x86 CPU since
# 2013-2015). GGML_CPU_ALL_VARIANTS would pick AVX-512 at run time, but llama-cpp-python cannot load
# such a build yet (it does not call ggml_backend_load_all; llama-cpp-python issue #2069).
ARCH := $(shell uname -m)
ifeq ($(ARCH),x86_64)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
else
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
endif
# Built once per machine, version and flags, and kept outside the checkout so a fresh clone reuses it.
# pip's own wheel cache is not used: it would hand back a wheel built with other flags.
LLAMA_WHEELS := $(HOME)/.cache/keel/wheels/$(ARCH)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-8)
LLAMA_PIN = $(VENV)/llama-cpp-python.txt

.PHONY: run test lint typecheck pytest bench lock clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Keel needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)

# The llama-cpp-python sdist pinned in the lock (hash checked), built into a portable wheel.
$(VENV)/.llama-installed: $(LOCK_RUN) $(LOCK_BUILD) | $(BIN)/python
	awk '/^llama-cpp-python==/{p=1;print;next} p&&/^[^ ]/{p=0} p' $(LOCK_RUN) > $(LLAMA_PIN)
	@version=$$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' $(LLAMA_PIN)); \
	if ! ls $(LLAMA_WHEELS)/llama_cpp_python-$$version-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $$version for $(ARCH) with $(LLAMA_CMAKE_ARGS) (about 5 minutes, once)"; \
		$(PIP) install --quiet --require-hashes --no-deps -r $(LOCK_BUILD) && \
		rm -rf $(LLAMA_WHEELS).tmp && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --quiet --no-deps --no-cache-dir --no-build-isolation \
			--require-hashes -r $(LLAMA_PIN) -w $(LLAMA_WHEELS).tmp && \
		mkdir -p $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp/*.whl $(LLAMA_WHEELS)/ && rm -rf $(LLAMA_WHEELS).tmp \
		|| exit 1; \
	fi; \
	$(PIP) install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-$$version-*.whl
	touch $@

# Keel itself goes in editable, with no build isolation: its build backend comes from the lock too.
$(STAMP_RUN): $(LOCK_RUN) pyproject.toml $(VENV)/.llama-installed
	$(PIP) install --quiet --require-hashes --no-deps -r $(LOCK_RUN)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(STAMP_TEST): $(LOCK_DEV) pyproject.toml $(VENV)/.llama-installed
	$(PIP) install --quiet --require-hashes --no-deps -r $(LOCK_DEV)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	KEEL_LOG_FORMAT=$${KEEL_LOG_FORMAT:-console} $(BIN)/keel serve

test: $(STAMP_TEST) lint typecheck pytest

lint: $(STAMP_TEST)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP_TEST)
	$(BIN)/mypy

pytest: $(STAMP_TEST)
	$(BIN)/python -m pytest

bench: $(STAMP_TEST)
	$(BIN)/python bench/gateway.py

# Refresh every pin to the newest releases that pyproject.toml's ranges allow, for Linux x86-64 and
# aarch64 and Python 3.11+ in one universal file each; then `make test` and commit (docs/development.md).
UV_COMPILE = $(BIN)/uv pip compile --quiet --universal --generate-hashes --python-version 3.11 --upgrade \
	--custom-compile-command 'make lock'
lock: $(STAMP_TEST)
	$(UV_COMPILE) pyproject.toml --extra local --extra dev -o $(LOCK_DEV)
	$(UV_COMPILE) pyproject.toml --extra local -c $(LOCK_DEV) -o $(LOCK_RUN)
	$(UV_COMPILE) requirements/build.in -o $(LOCK_BUILD)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
