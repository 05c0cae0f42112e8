"""The Responses ingress (`POST /v1/responses`): the client's body checked for what the gateway
relies on, its prompt counted through a chat-shaped view, errors in OpenAI's JSON, and a
stream's failure as the Responses `error` event. What each target makes of the rest is its
translator's business (`providers.responses_translators`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Response
from llm_gateway.chat_request import MAX_MODEL_CHARS, invalid, parse_json_object
from llm_gateway.domain import Route, Tenant
from llm_gateway.errors import GatewayError
from llm_gateway.ingress import Ask, openai_error_response
from llm_gateway.providers.responses_to_chat import prompt_view
from llm_gateway.stored_responses import check_previous
from llm_gateway.tokens import count_prompt

if TYPE_CHECKING:
    from llm_gateway.services import Services


def parse_responses(raw: bytes, max_depth: int) -> Ask:
    """A Responses body, checked where the gateway reads it; unknown fields are left to the
    target's translator (or to OpenAI)."""
    body = parse_json_object(raw, max_depth)
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise invalid("'model' must be a non-empty string", "model", "invalid_type")
    if len(model) > MAX_MODEL_CHARS:
        raise invalid(f"'model' must be at most {MAX_MODEL_CHARS} characters", "model",
                       "invalid_value")
    given = body.get("input")
    if given is not None and not isinstance(given, str | list):
        raise invalid("'input' must be a string or an array of items", "input", "invalid_type")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream", "invalid_type")
    limit = body.get("max_output_tokens")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise invalid("'max_output_tokens' must be a positive integer", "max_output_tokens",
                       "invalid_value")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise invalid("'previous_response_id' must be a string", "previous_response_id",
                       "invalid_type")
    # A Responses stream always ends with its usage (in `response.completed`).
    return Ask(model=model, stream=stream is True, max_output_tokens=limit, wants_usage=True,
               body=body, raw=raw)


class ResponsesIngress:
    """`POST /v1/responses`."""

    wire = "openai.responses"
    endpoint = "responses"

    def parse(self, raw: bytes, max_depth: int) -> Ask:
        return parse_responses(raw, max_depth)

    async def count_prompt(self, ask: Ask, encoding: str) -> int:
        return await count_prompt(prompt_view(ask.body), encoding, len(ask.raw))

    async def check_access(self, svc: Services, tenant: Tenant, route: Route, ask: Ask) -> None:
        """`previous_response_id` names one of this tenant's responses (see `stored_responses`)."""
        await check_previous(svc, tenant, route, ask.body.get("previous_response_id"))

    def error_response(self, exc: GatewayError) -> Response:
        return openai_error_response(exc)

    def stream_error(self, exc: GatewayError) -> bytes:
        """The Responses `error` event (the SDK raises it as an APIError). Its translators end
        their streams themselves (`fail`), numbering the event after theirs; this one is for a
        stream that never got a translator's first event out."""
        event: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message,
                                 "param": exc.param, "sequence_number": 0}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


RESPONSES = ResponsesIngress()
