"""The provider table: one adapter per wire format pair, chosen by a target's `provider`."""

from __future__ import annotations

from llm_gateway.providers.anthropic import AnthropicProvider
from llm_gateway.providers.base import Provider
from llm_gateway.providers.openai import OpenAIProvider, SelfHostedProvider


def build_providers(default_max_tokens: int) -> dict[str, Provider]:
    return {
        "openai": OpenAIProvider(),
        "self-hosted": SelfHostedProvider(),
        "anthropic": AnthropicProvider(default_max_tokens),
    }
