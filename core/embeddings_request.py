"""The Embeddings ingress (`POST /v1/embeddings`): OpenAI's body, checked for what the gateway
relies on (the model, and an `input` it can count for TPM); errors in OpenAI's JSON.

`input` is a string, an array of strings, an array of token ids, or an array of arrays of token
ids. Its tokens: strings counted with the limits' tokenizer (in a counting thread when large),
token ids by number. The reply has no output tokens: the reservation is the input's alone.
"""

from __future__ import annotations

from typing import Any

from blacksheep import Response
from llm_gateway.chat_request import CHAT, MAX_MODEL_CHARS, parse_json_object
from llm_gateway.errors import GatewayError, InvalidRequest
from llm_gateway.ingress import Ask, openai_error_response
from llm_gateway.tokens import INLINE_BYTES, count_text_tokens, in_thread

# OpenAI's own bound on an embeddings request: 2048 inputs.
MAX_INPUTS = 2048


def parse_embeddings(raw: bytes, max_depth: int) -> Ask:
    body = parse_json_object(raw, max_depth)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model",
                             code="invalid_value")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' must be at most {MAX_MODEL_CHARS} characters",
                             param="model", code="invalid_value")
    check_input(body.get("input"))
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'",
                             param="encoding_format", code="invalid_value")
    return Ask(model=model, stream=False, max_output_tokens=0, wants_usage=False, body=body,
               raw=raw)


def _is_token(v: Any) -> bool:
    return type(v) is int and v >= 0


def check_input(value: Any) -> None:
    """A string, or a non-empty array (at most MAX_INPUTS) of strings, of token ids, or of
    non-empty arrays of token ids."""
    bad = InvalidRequest("'input' must be a string, an array of strings, an array of token ids "
                         "or an array of arrays of token ids", param="input",
                         code="invalid_value")
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise bad
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(f"'input' may hold at most {MAX_INPUTS} items", param="input",
                             code="invalid_value")
    first = value[0]
    if isinstance(first, str):
        ok = all(isinstance(v, str) for v in value)
    elif isinstance(first, list):
        ok = all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value)
    else:
        ok = all(_is_token(v) for v in value)
    if not ok:
        raise bad


def input_tokens(value: Any, encoding: str) -> int:
    """The tokens of a checked `input`."""
    if isinstance(value, str):
        return count_text_tokens(value, encoding)
    if value and isinstance(value[0], str):
        return sum(count_text_tokens(v, encoding) for v in value)
    if value and isinstance(value[0], list):
        return sum(len(v) for v in value)
    return len(value)


class EmbeddingsIngress:
    """`POST /v1/embeddings`."""

    wire = "openai.embeddings"
    endpoint = "embeddings"

    def parse(self, raw: bytes, max_depth: int) -> Ask:
        return parse_embeddings(raw, max_depth)

    async def count_prompt(self, ask: Ask, encoding: str) -> int:
        value = ask.body.get("input")
        if len(ask.raw) <= INLINE_BYTES:
            return input_tokens(value, encoding)
        return await in_thread(input_tokens, value, encoding)

    def error_response(self, exc: GatewayError) -> Response:
        return openai_error_response(exc)

    def stream_error(self, exc: GatewayError) -> bytes:
        return CHAT.stream_error(exc)  # never used: an embeddings reply does not stream


EMBEDDINGS = EmbeddingsIngress()
