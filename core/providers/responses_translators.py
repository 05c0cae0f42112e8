"""The translators of a Responses client (`openai.responses`), one per upstream wire format:

    (openai.responses, openai.responses)    ResponsesPassthrough: bytes to `{base_url}/responses`
                                            with only `model` patched, relayed as sent; usage
                                            read for the limits and the ledger; each response id
                                            remembered with its tenant and target
    (openai.responses, openai.chat)         ResponsesToChat (`responses_to_chat`), self-hosted
    (openai.responses, anthropic.messages)  ResponsesToMessages: `responses_to_chat` composed with
                                            the Chat Completions <-> Messages adapter

A translated reply echoes the client's request (instructions, tools, options): it reads it from
the `ask` the request path passes. The pass-through remembers each response id with the tenant
and target that served it, so the request path binds it to each call (`for_call`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import GatewayError
from llm_gateway.providers.anthropic import AnthropicProvider, AnthropicStream, to_chat_completion
from llm_gateway.providers.base import (
    Counter,
    Headers,
    Provider,
    StreamTranslator,
    UpstreamRequest,
    upstream_json,
)
from llm_gateway.providers.openai import map_openai_error
from llm_gateway.providers.openai_responses import (
    ResponsesPassthroughStream,
    parse_responses_reply,
    responses_request,
)
from llm_gateway.providers.responses_to_chat import (
    ChainedStream,
    ChatToResponsesStream,
    to_chat_request,
    to_response,
)
from llm_gateway.response_owners import remember

if TYPE_CHECKING:
    from llm_gateway.call import Call
    from llm_gateway.ingress import Ask
    from llm_gateway.services import Services


class ResponsesPassthrough:
    name = "openai"
    announces_prompt = False

    def __init__(self, remember_id: Any = None) -> None:
        # Bound to a call: told each response id relayed (to remember who owns it).
        self._remember_id = remember_id

    def for_call(self, svc: Services, call: Call, target: Target) -> ResponsesPassthrough:
        return ResponsesPassthrough(partial(remember, svc, call, target))

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None, headers: Headers = ()) -> UpstreamRequest:
        return responses_request(target, body, raw, api_key=api_key)

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        content, usage, response_id = parse_responses_reply(content)
        if response_id is not None and self._remember_id is not None:
            self._remember_id(response_id)
        return content, usage

    def stream_translator(self, client_model: str, client_wants_usage: bool, count: Counter, *,
                          ask: Ask | None = None,
                          prompt_tokens: int = 0) -> ResponsesPassthroughStream:
        return ResponsesPassthroughStream(count, self._remember_id)

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        return map_openai_error(status, content, headers)


class ResponsesToChat:
    """Responses <-> Chat Completions, over the chat translator of the target's provider (the
    self-hosted one: it fills in what such servers omit)."""

    announces_prompt = False

    def __init__(self, chat: Provider) -> None:
        self.name = chat.name
        self._chat = chat

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None, headers: Headers = ()) -> UpstreamRequest:
        chat = to_chat_request(body, target.model, stream=stream, target_provider=target.provider)
        return self._chat.build_request(target, chat, orjson.dumps(chat), stream=stream,
                                        api_key=api_key)

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        response, usage = to_response(upstream_json(content), client_model,
                                      request=_request(ask))
        return orjson.dumps(response), usage

    def stream_translator(self, client_model: str, client_wants_usage: bool, count: Counter, *,
                          ask: Ask | None = None, prompt_tokens: int = 0) -> StreamTranslator:
        return ChatToResponsesStream(client_model, _request(ask), count)

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        return self._chat.map_error(status, content, headers)


class ResponsesToMessages:
    """Responses -> Chat Completions -> Anthropic Messages, and back the same way."""

    name = "anthropic"
    announces_prompt = False

    def __init__(self, anthropic: AnthropicProvider) -> None:
        self._anthropic = anthropic

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None, headers: Headers = ()) -> UpstreamRequest:
        chat = to_chat_request(body, target.model, stream=stream, target_provider="anthropic")
        return self._anthropic.build_request(target, chat, b"", stream=stream, api_key=api_key)

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        chat, _ = to_chat_completion(upstream_json(content), client_model)
        response, usage = to_response(chat, client_model, request=_request(ask))
        return orjson.dumps(response), usage

    def stream_translator(self, client_model: str, client_wants_usage: bool, count: Counter, *,
                          ask: Ask | None = None, prompt_tokens: int = 0) -> StreamTranslator:
        # The chat stream in the middle always carries usage: the Responses events end with it.
        return ChainedStream(AnthropicStream(client_model, True, count),
                             ChatToResponsesStream(client_model, _request(ask), None))

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        return self._anthropic.map_error(status, content, headers)


def _request(ask: Ask | None) -> dict[str, Any]:
    """The client's Responses body, which a translated reply echoes (instructions, tools,
    options); without it (a reply read outside a request) the reply echoes defaults."""
    return ask.body if ask is not None else {}
