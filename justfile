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

# Benchmarks: k6 scenarios against the gateway, the bare stack and the upstream, same run.
# Flags pass through: `just perf --quick`, `just perf --scenarios stream-32 --soak 600`.
perf *args: install
    {{py}} -m pip install -q -e '.[test,perf]'
    {{py}} perf/run.py {{args}}
