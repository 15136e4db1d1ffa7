#!/usr/bin/env bash
# Install a real OpenAPI tool server for the tests: PyPI's mcpo (an MCP-to-OpenAPI proxy) and the MCP server it
# fronts, mcp-server-time, each in a venv of its own (mcpo 0.0.20 needs mcp<2 and fastapi<0.130; mcp-server-time
# needs mcp 2.x). Both are cached outside the repo, keyed by the pinned versions; a marker written last makes a half
# install be redone. A cache hit costs nothing. Prints the folder holding both venvs (mcpo/ and time/) as the last
# line of stdout; progress goes to stderr. About a minute when it has to install.
set -euo pipefail

MCPO_VERSION=0.0.20
MCP_SERVER_TIME_VERSION=2026.10.19
cache_root=${QUEUEGATE_CACHE:-$HOME/.cache/queuegate}
target_dir="$cache_root/tool-servers-mcpo$MCPO_VERSION-time$MCP_SERVER_TIME_VERSION"
marker="$target_dir/.installed"
python=${PYTHON:-python3}

log() { printf '[install_tool_servers] %s\n' "$*" >&2; }

installed() {
    [ -f "$marker" ] && [ -x "$target_dir/mcpo/bin/mcpo" ] && [ -x "$target_dir/time/bin/mcp-server-time" ] \
        && "$target_dir/mcpo/bin/python" -c '' 2>/dev/null && "$target_dir/time/bin/python" -c '' 2>/dev/null
}

if installed; then
    log "cached: $target_dir"
    echo "$target_dir"
    exit 0
fi

started=$SECONDS
rm -rf "$target_dir"
mkdir -p "$target_dir"

log "installing mcpo==$MCPO_VERSION"
"$python" -m venv "$target_dir/mcpo"
"$target_dir/mcpo/bin/python" -m pip install --quiet --disable-pip-version-check \
    "mcpo==$MCPO_VERSION" "mcp<2" "fastapi<0.130" >&2

log "installing mcp-server-time==$MCP_SERVER_TIME_VERSION"
"$python" -m venv "$target_dir/time"
"$target_dir/time/bin/python" -m pip install --quiet --disable-pip-version-check \
    "mcp-server-time==$MCP_SERVER_TIME_VERSION" >&2

# Both must at least start before the install counts.
"$target_dir/mcpo/bin/python" -c 'import mcpo.main' >&2
"$target_dir/time/bin/mcp-server-time" --help >/dev/null
"$target_dir/mcpo/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(mcpo|mcp|fastapi|uvicorn) ' >&2 || true

touch "$marker"
log "installed in $((SECONDS - started)) s"
echo "$target_dir"
