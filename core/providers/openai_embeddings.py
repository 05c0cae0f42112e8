"""OpenAI Embeddings (the client) -> OpenAI Embeddings (`openai`, `self-hosted` upstreams): bytes.

The request is forwarded with only `model` patched (`encoding_format` and every other field
pass through: the openai SDK asks for base64 by default), the response as the upstream sent it.
Its usage is `usage.prompt_tokens` (input); an embedding has no output tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llm_gateway.domain import Target, Usage
from llm_gateway.errors import GatewayError, InternalError
from llm_gateway.providers.base import (
    Counter,
    Headers,
    StreamTranslator,
    UpstreamRequest,
    token_count,
    upstream_json,
)
from llm_gateway.providers.openai import map_openai_error, openai_request, with_model

if TYPE_CHECKING:
    from llm_gateway.ingress import Ask


class EmbeddingsProvider:
    """The translator for (openai.embeddings, openai.embeddings)."""

    announces_prompt = False

    def __init__(self, name: str = "openai") -> None:
        self.name = name

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None, headers: Headers = ()) -> UpstreamRequest:
        return openai_request(target, "embeddings", api_key, with_model(body, raw, target.model))

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        data = upstream_json(content)
        u = data.get("usage")
        n = token_count(u.get("prompt_tokens")) if isinstance(u, dict) else None
        if n is None:  # the gateway's own count of the input stands
            return content, Usage(prompt_tokens, 0, 0, reported=False)
        return content, Usage(n, 0, 0, reported=True)

    def stream_translator(self, client_model: str, client_wants_usage: bool, count: Counter, *,
                          ask: Ask | None = None, prompt_tokens: int = 0) -> StreamTranslator:
        raise InternalError("an embeddings request does not stream")

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        return map_openai_error(status, content, headers)
