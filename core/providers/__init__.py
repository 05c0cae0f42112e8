"""The provider table and the translator table.

`PROVIDERS`: a target's `provider` -> the wire format its upstream speaks (admin validation and
routing both read it). `TRANSLATORS`: (the client's wire format, the upstream's) -> how to make
the translator for that pair. Where the two are the same, the translator forwards the bytes
with only `model` patched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llm_gateway.providers.anthropic import AnthropicProvider
from llm_gateway.providers.base import Provider
from llm_gateway.providers.openai import OpenAIProvider, SelfHostedProvider
from llm_gateway.settings import Settings

OPENAI_CHAT = "openai.chat"  # OpenAI Chat Completions
ANTHROPIC_MESSAGES = "anthropic.messages"  # Anthropic Messages


@dataclass(frozen=True, slots=True)
class ProviderKind:
    wire: str
    fills_ids: bool = False  # its servers may omit `id`/`created`: the gateway fills them in


PROVIDERS: dict[str, ProviderKind] = {
    "openai": ProviderKind(OPENAI_CHAT),
    "anthropic": ProviderKind(ANTHROPIC_MESSAGES),
    "self-hosted": ProviderKind(OPENAI_CHAT, fills_ids=True),
}


def _openai_chat(kind: ProviderKind, s: Settings) -> Provider:
    return SelfHostedProvider() if kind.fills_ids else OpenAIProvider()


def _chat_to_messages(kind: ProviderKind, s: Settings) -> Provider:
    return AnthropicProvider(s.default_max_tokens)


TRANSLATORS: dict[tuple[str, str], Callable[[ProviderKind, Settings], Provider]] = {
    (OPENAI_CHAT, OPENAI_CHAT): _openai_chat,
    (OPENAI_CHAT, ANTHROPIC_MESSAGES): _chat_to_messages,
}


def build_translators(settings: Settings) -> dict[tuple[str, str], Provider]:
    """Per worker: (client wire format, provider name) -> its translator, so the router finds a
    target's in one lookup. A pair missing from `TRANSLATORS` is a target that ingress cannot
    use (503 for that target; failover goes on)."""
    return {
        (client, name): make(kind, settings)
        for name, kind in PROVIDERS.items()
        for (client, upstream), make in TRANSLATORS.items()
        if upstream == kind.wire
    }
