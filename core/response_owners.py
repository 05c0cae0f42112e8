"""Who owns each response id the gateway relayed from an upstream that keeps responses: written
as the id goes by (off the request path), read before a request reaches a stored response
(see `stored_responses`)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

from llm_gateway.domain import ResponseOwner, Target, Tenant

if TYPE_CHECKING:
    from llm_gateway.call import Call
    from llm_gateway.services import Services

RETENTION_S = 30 * 86400  # OpenAI's own retention of stored responses
# OpenAI's ids are `resp_` and hex; anything else the gateway never relayed as an id.
RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# A response relayed a moment ago may still be on its way to the store (written off the
# request path): a miss is read again this many times, this far apart, before it counts.
_MISS_RETRIES = 3
_MISS_WAIT_S = 0.05
log = logging.getLogger("llm_gateway.responses")
_pending: set[asyncio.Task[None]] = set()


def remember(svc: Services, call: Call, target: Target, response_id: str) -> None:
    """Record who owns `response_id`, off the request path (a failure is logged: the response
    itself was served). Nothing is recorded for a request that said `store: false`."""
    if call.ask.body.get("store") is False or not RESPONSE_ID.fullmatch(response_id):
        return
    owner = ResponseOwner(response_id, call.tenant.tenant_id, call.route.name, target.name,
                          time.time() + RETENTION_S)
    task = asyncio.ensure_future(_put(svc, owner))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _put(svc: Services, owner: ResponseOwner) -> None:
    try:
        await svc.store.put_response_owner(owner)
    except Exception:
        log.exception("remembering the owner of response %s failed", owner.response_id)


async def owner_of(svc: Services, tenant: Tenant, response_id: str) -> ResponseOwner | None:
    """The owner of `response_id` if it is `tenant`, else None."""
    if not RESPONSE_ID.fullmatch(response_id):
        return None
    for attempt in range(_MISS_RETRIES):
        owner = await svc.store.get_response_owner(response_id)
        if owner is not None:
            return owner if owner.tenant_id == tenant.tenant_id else None
        if attempt + 1 < _MISS_RETRIES:
            await asyncio.sleep(_MISS_WAIT_S)
    return None
