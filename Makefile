# meshserve: the one interface. `make run` and `make test` work on a fresh machine.
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS := examples/models
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test unit integration e2e lint typecheck protos bench models setup clean native perf_analyzer

setup: $(STAMP) native

# xds-protos ships an older copy of opentelemetry/proto/*; which copy wins depends on the install
# order, and the OTLP exporter needs opentelemetry-proto's own: setup reinstalls it last, as
# pyproject.toml pins it
export OTEL_PROTO_PIN := import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(d for d in deps if d.startswith("opentelemetry-proto")))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[onnx,torch,tensorflow,python,dev]'
	$(PY) -m pip install -q --force-reinstall --no-deps "$$($(PY) -c "$$OTEL_PROTO_PIN")"
	touch $(STAMP)

# grpc_front: the C++ gRPC front every service puts on its port (services/core/native_front.py).
# Needs Debian's libgrpc++-dev (.ci/run installs it); without it services fall back to grpc.aio.
FRONT := services/core/native/build/grpc_front
native: $(FRONT)
$(FRONT): services/core/native/grpc_front.cc
	@if pkg-config --exists grpc++ 2>/dev/null; then \
	  mkdir -p $(@D) && echo "building $@" && \
	  g++ -O2 -std=c++17 -Wall -Wextra -o $@.tmp $< $$(pkg-config --cflags --libs grpc++) -lpthread && \
	  mv $@.tmp $@; \
	else \
	  echo "note: libgrpc++-dev is not installed (apt-get install libgrpc++-dev pkg-config);" \
	       "services will serve gRPC with grpc.aio instead of grpc_front"; \
	fi

# perf_analyzer (PyPI's wheel needs a newer glibc: the script sets up a private one), for
# `make bench` and the tests that check it works against the mesh (they skip where it is missing)
perf_analyzer: $(STAMP)
	@bash benchmarks/setup_perf_analyzer.sh || \
	  echo "note: perf_analyzer could not be set up; the tests that run it will skip"

models: $(STAMP) native
	$(PY) -m examples.build_repository $(MODELS)

# The whole mesh on loopback: gateway gRPC :8001, HTTP :8000, metrics :8002 (Ctrl-C drains).
run: models
	$(VENV)/bin/meshserve up --model-repository $(MODELS)

test: $(STAMP) native perf_analyzer
	$(PY) -m pytest -q tests/unit
	$(PY) -m pytest -q tests/integration tests/e2e

unit: $(STAMP) native
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(PY) -m protos.build

bench: models perf_analyzer
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.seed
	$(PY) -m benchmarks.ensemble

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .mypy_cache .ruff_cache $(dir $(FRONT))
