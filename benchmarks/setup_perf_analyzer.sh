#!/usr/bin/env bash
# Install a working perf_analyzer into benchmarks/.tools/ without touching anything system-wide.
#
# PyPI's perf-analyzer 2.60.0 ships only manylinux_2_38 wheels; this machine's glibc is older
# (Debian 12, glibc 2.36), and a plain `pip install perf-analyzer` silently picks an empty
# placeholder. So: download the real wheel for the manylinux_2_38 platform, unpack it, fetch
# Debian 13 (trixie) libc6 / libstdc++6 / libgcc-s1 with apt-get pointed at private
# sources/lists/cache folders (the machine's own Debian mirror, read from its apt config), unpack
# them with dpkg-deb -x, and write a wrapper that runs the binary through trixie's dynamic loader.
#
# Idempotent: when the wrapper exists and runs, it exits at once. (This perf_analyzer build has no
# --help option: it prints its usage when run without arguments and exits 99; `--version` exits 0,
# so that is the check.)
# Environment: PYTHON (default .venv/bin/python, else python3), PA_VERSION (default 2.60.0),
# DEBIAN_MIRROR (override the mirror URI read from /etc/apt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/benchmarks/.tools"
WRAPPER="$TOOLS/perf_analyzer"
PA_VERSION="${PA_VERSION:-2.60.0}"
SYSROOT="$TOOLS/trixie-root"
APTDIR="$TOOLS/apt"
WHEELDIR="$TOOLS/wheel"
DEBS=(libc6 libstdc++6 libgcc-s1)

log() { printf 'setup_perf_analyzer: %s\n' "$*" >&2; }

if [[ -x "$WRAPPER" ]] && "$WRAPPER" --version >/dev/null 2>&1; then
    log "perf_analyzer ready at $WRAPPER"
    exit 0
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$TOOLS"

# --- 1. the wheel -------------------------------------------------------------------------------
find_binary() {
    # The wheel ships a Python launcher plus the ELF; return the first ELF named perf_analyzer.
    local f
    while IFS= read -r -d '' f; do
        if [[ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" == '177ELF' ]]; then
            printf '%s\n' "$f"
            return 0
        fi
    done < <(find "$WHEELDIR" -type f -name perf_analyzer -print0)
    return 1
}

if ! BINARY="$(find_binary 2>/dev/null)"; then
    log "downloading perf-analyzer $PA_VERSION wheel (manylinux_2_38)"
    rm -rf "$WHEELDIR" && mkdir -p "$WHEELDIR/dl"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
        --platform manylinux_2_38_x86_64 --python-version 3.12 \
        -d "$WHEELDIR/dl" "perf-analyzer==$PA_VERSION"
    "$PYTHON" -m zipfile -e "$WHEELDIR"/dl/perf_analyzer-*.whl "$WHEELDIR/unpacked"
    rm -rf "$WHEELDIR/dl"
    BINARY="$(find_binary)" || { log "no perf_analyzer ELF inside the wheel"; exit 1; }
fi
chmod +x "$BINARY"
log "binary: $BINARY"

# --- 2. Debian 13 runtime libraries -------------------------------------------------------------
debian_mirror() {
    # First enabled Debian archive URI (not the security archive) in the system's apt config,
    # in either deb822 (.sources) or one-line (.list) format.
    local files=() f
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    awk '
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i; next }
        /^[[:space:]]*deb[[:space:]]/ {
            for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break }
        }
    ' "${files[@]}" | grep -E '/debian/?$' | head -n 1
}

LOADER="$SYSROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
if [[ ! -e "$LOADER" || ! -e "$SYSROOT/usr/lib/x86_64-linux-gnu/libstdc++.so.6" ]]; then
    MIRROR="${DEBIAN_MIRROR:-$(debian_mirror || true)}"
    [[ -n "$MIRROR" ]] || { log "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR"; exit 1; }
    KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/debs"
    {
        echo "Types: deb"
        echo "URIs: $MIRROR"
        echo "Suites: trixie"
        echo "Components: main"
        [[ -f "$KEYRING" ]] && echo "Signed-By: $KEYRING"
    } >"$APTDIR/trixie.sources"
    : >"$APTDIR/status"
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APTDIR/trixie.sources"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$APTDIR/lists"
        -o "Dir::State::status=$APTDIR/status"
        -o "Dir::Cache=$APTDIR/cache"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=/dev/null"
        -o "APT::Architecture=amd64"
        -o "APT::Architectures::=amd64"
        -o "APT::Sandbox::User=root"
        -o "Debug::NoLocking=1"
    )
    log "fetching trixie ${DEBS[*]} from the system's Debian mirror"
    apt-get "${APT_OPTS[@]}" -qq update
    (cd "$APTDIR/debs" && apt-get "${APT_OPTS[@]}" -qq download "${DEBS[@]}")
    rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
    for deb in "$APTDIR"/debs/*.deb; do
        dpkg-deb -x "$deb" "$SYSROOT"
    done
    rm -rf "$APTDIR/lists" "$APTDIR/cache"  # ~20 MB of package indexes, not needed once unpacked
fi
[[ -e "$LOADER" ]] || { log "trixie loader missing after unpack: $LOADER"; exit 1; }

# --- 3. the wrapper -----------------------------------------------------------------------------
LIBPATH="$SYSROOT/usr/lib/x86_64-linux-gnu:$SYSROOT/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"
cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# Generated by benchmarks/setup_perf_analyzer.sh: perf_analyzer $PA_VERSION through Debian 13's loader.
exec "$LOADER" --library-path "$LIBPATH" "$BINARY" "\$@"
EOF
chmod +x "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

if ! VERSION="$("$WRAPPER" --version 2>&1)"; then
    log "perf_analyzer --version failed:"
    printf '%s\n' "$VERSION" >&2
    exit 1
fi
log "perf_analyzer ready at $WRAPPER ($VERSION)"
