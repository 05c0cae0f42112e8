"""The provider table and the translator table.

`PROVIDERS`: a target's `provider` -> the wire formats its upstream speaks, its own first
(admin validation and routing both read it). `TRANSLATORS`: (the client's wire format, the
upstream's) -> how to make the translator for that pair. Where the two are the same, the
translator forwards the bytes with only `model` patched; a provider that speaks the client's
wire format is always reached that way, else through its first wire that has a translator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llm_gateway.providers.anthropic import AnthropicProvider
from llm_gateway.providers.anthropic_messages import MessagesPassThrough
from llm_gateway.providers.anthropic_to_openai import MessagesToChat
from llm_gateway.providers.base import Provider
from llm_gateway.providers.openai import OpenAIProvider, SelfHostedProvider
from llm_gateway.providers.openai_embeddings import EmbeddingsProvider
from llm_gateway.providers.responses_translators import (
    ResponsesPassthrough,
    ResponsesToChat,
    ResponsesToMessages,
)
from llm_gateway.settings import Settings

OPENAI_CHAT = "openai.chat"  # OpenAI Chat Completions
OPENAI_RESPONSES = "openai.responses"  # OpenAI Responses
OPENAI_EMBEDDINGS = "openai.embeddings"  # OpenAI Embeddings
ANTHROPIC_MESSAGES = "anthropic.messages"  # Anthropic Messages


@dataclass(frozen=True, slots=True)
class ProviderKind:
    wires: tuple[str, ...]  # the wire formats its upstream speaks, its own first
    fills_ids: bool = False  # its servers may omit `id`/`created`: the gateway fills them in


PROVIDERS: dict[str, ProviderKind] = {
    "openai": ProviderKind((OPENAI_CHAT, OPENAI_RESPONSES, OPENAI_EMBEDDINGS)),
    "anthropic": ProviderKind((ANTHROPIC_MESSAGES,)),
    # vLLM, llama.cpp, Ollama: chat completions and embeddings, not (reliably) Responses.
    "self-hosted": ProviderKind((OPENAI_CHAT, OPENAI_EMBEDDINGS), fills_ids=True),
}


def _openai_chat(kind: ProviderKind, s: Settings) -> Provider:
    return SelfHostedProvider() if kind.fills_ids else OpenAIProvider()


def _chat_to_messages(kind: ProviderKind, s: Settings) -> Provider:
    return AnthropicProvider(s.default_max_tokens)


def _messages_to_messages(kind: ProviderKind, s: Settings) -> Provider:
    return MessagesPassThrough()


def _messages_to_chat(kind: ProviderKind, s: Settings) -> Provider:
    return MessagesToChat("self-hosted" if kind.fills_ids else "openai")


def _embeddings(kind: ProviderKind, s: Settings) -> Provider:
    return EmbeddingsProvider("self-hosted" if kind.fills_ids else "openai")
def _responses_passthrough(kind: ProviderKind, s: Settings) -> Provider:
    return ResponsesPassthrough()


def _responses_to_chat(kind: ProviderKind, s: Settings) -> Provider:
    return ResponsesToChat(_openai_chat(kind, s))


def _responses_to_messages(kind: ProviderKind, s: Settings) -> Provider:
    return ResponsesToMessages(AnthropicProvider(s.default_max_tokens))


TRANSLATORS: dict[tuple[str, str], Callable[[ProviderKind, Settings], Provider]] = {
    (OPENAI_CHAT, OPENAI_CHAT): _openai_chat,
    (OPENAI_CHAT, ANTHROPIC_MESSAGES): _chat_to_messages,
    (ANTHROPIC_MESSAGES, ANTHROPIC_MESSAGES): _messages_to_messages,
    (ANTHROPIC_MESSAGES, OPENAI_CHAT): _messages_to_chat,
    (OPENAI_EMBEDDINGS, OPENAI_EMBEDDINGS): _embeddings,
    (OPENAI_RESPONSES, OPENAI_RESPONSES): _responses_passthrough,
    (OPENAI_RESPONSES, OPENAI_CHAT): _responses_to_chat,
    (OPENAI_RESPONSES, ANTHROPIC_MESSAGES): _responses_to_messages,
}


def build_translators(settings: Settings) -> dict[tuple[str, str], Provider]:
    """Per worker: (client wire format, provider name) -> its translator, so the router finds a
    target's in one lookup. A pair missing from `TRANSLATORS` is a target that ingress cannot
    use (503 for that target; failover goes on)."""
    clients = {client for client, _ in TRANSLATORS}
    table: dict[tuple[str, str], Provider] = {}
    for name, kind in PROVIDERS.items():
        for client in clients:
            # The client's own wire first: a pass-through beats any translation.
            for upstream in sorted(kind.wires, key=lambda wire: wire != client):
                make = TRANSLATORS.get((client, upstream))
                if make is not None:
                    table[client, name] = make(kind, settings)
                    break
    return table
