# llm-gateway tasks. `pip install rust-just` provides `just`.
venv := ".venv"
py := venv / "bin/python"

# Create the virtualenv and install the gateway with test tools.
install:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q -e '.[test]'

# Run the gateway on the embedded default (no services), port 8080.
run: install
    {{venv}}/bin/llm-gateway serve

# Run the whole test suite (starts its own redis-server, moto and fake upstreams).
test: install
    {{py}} -m pytest -q

# Lint and type-check.
lint: install
    {{venv}}/bin/ruff check .
    bash .ci/mypy

# Benchmarks: k6 scenarios against the gateway configurations, the bare stack and the upstream
# (nginx serving fixed bodies; wrk measures it alone), same run, with a py-spy profile per feature.
# Flags pass through: `just perf --quick`, `just perf --scenarios stream-32 --soak 600`,
# `just perf --upstream fake`, `just perf --configs gateway,gateway+trace`.
perf *args: install
    #!/usr/bin/env bash
    set -euo pipefail
    {{py}} -m pip install -q -e '.[test,perf]'
    missing=""
    for tool in nginx:nginx-light wrk:wrk redis-server:redis-server; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] \
            || missing="$missing ${tool#*:}"
    done
    if [ -n "$missing" ]; then
        echo "perf: installing$missing" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
    {{py}} perf/run.py {{args}}
