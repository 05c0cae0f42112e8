"""`python -m llm_gateway`: the one module of `core` that imports `workers` (the process layer),
because the command line lives there; nothing in `core` imports this module."""

from llm_gateway.workers.cli import main

main()
