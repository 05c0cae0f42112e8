"""Test doubles that ship with the gateway: `llm-gateway fake-upstream` for demos and tests."""
