"""The upstream HTTP client: one pooled, long-lived aiohttp session per worker.

aiohttp is called directly rather than through httpx: on this machine httpx's default pool
(httpcore) measured ~20x slower than aiohttp, and `perf/bench_upstream_client.py` records the
comparison (httpx default pool, httpx over an aiohttp transport, aiohttp). aiohttp exceptions are
translated into gateway errors here, once, and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
from llm_gateway.deadline import deadline
from llm_gateway.errors import GatewayError, UpstreamError, UpstreamRedirect, UpstreamTimeout
from llm_gateway.providers.base import UpstreamRequest
from llm_gateway.settings import Settings
from yarl import URL

# An error response is read this far: error JSON is small, and the message that reaches the
# client is cut far shorter (see the providers' map_error).
ERROR_BODY_MAX = 64 * 1024


class UpstreamClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_s,
            # Bounds every read of the body: the idle gap between stream chunks.
            sock_read=settings.stream_idle_timeout_s,
        )
        # A non-stream upstream may be silent until generation ends: the request timeout, not
        # the stream idle timeout, bounds each read.
        self._complete_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.request_timeout_s,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=60.0, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            # One session serves every tenant: a cookie an upstream sets must never ride along
            # on another tenant's request (and an empty jar is still filtered per request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, req: UpstreamRequest, *, stream: bool,
                   method: str = "POST") -> aiohttp.ClientResponse:
        """Send (POST, unless `method` says otherwise) and wait for the response headers: within
        the first-byte timeout for a stream, within the request timeout otherwise (a non-stream
        upstream often sends its headers only when generation has ended). Redirects are never
        followed."""
        assert self._session is not None, "upstream client not started"
        s = self._settings
        wait_s = s.first_byte_timeout_s if stream else s.request_timeout_s
        with translate_errors(), deadline(wait_s):
            resp = await self._session.request(
                method, _url(req.url), data=req.body, headers=req.headers,
                # A redirect would re-send the prompt, and the target's key, elsewhere.
                allow_redirects=False,
                timeout=self._timeout if stream else self._complete_timeout,
            )
        if 300 <= resp.status < 400:
            resp.close()
            raise UpstreamRedirect(
                f"the upstream provider answered with a redirect (status {resp.status}); "
                "the gateway does not follow redirects"
            )
        return resp

    async def read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """A non-stream body, whole: within the request timeout, and refused with 502 as soon
        as it is known to exceed GATEWAY_MAX_RESPONSE_BYTES (its connection is then closed)."""
        limit = self._settings.max_response_bytes
        declared = resp.content_length
        body, complete = b"", False
        if declared is None or declared <= limit:
            with translate_errors(), deadline(self._settings.request_timeout_s):
                body, complete = await _read_prefix(resp, limit)
        if not complete:
            resp.close()
            raise UpstreamError(
                f"the upstream provider's response is larger than the limit of {limit} bytes",
                code="upstream_response_too_large",
            )
        return body

    async def read_error_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """At most the first 64 KiB of an error response: room for any error JSON. A longer
        body is cut there (it then reads as no JSON at all) and its connection closed."""
        with translate_errors():
            async with asyncio.timeout(self._settings.request_timeout_s):
                body, complete = await _read_prefix(resp, ERROR_BODY_MAX)
        if not complete:
            resp.close()
        return body

    async def read_first(self, resp: aiohttp.ClientResponse) -> bytes:
        """The first chunk of a stream, within the first-byte timeout (before any byte has gone to
        the client, so a failure here may still be retried elsewhere)."""
        with translate_errors(), deadline(self._settings.first_byte_timeout_s):
            return await resp.content.readany()

    @staticmethod
    async def chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        with translate_errors():
            async for chunk in resp.content.iter_any():
                yield chunk


async def _read_prefix(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether that was all of it. Reading stops as soon
    as the limit is passed, so an endless body costs `limit` bytes, not all of memory."""
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            parts.append(chunk[: len(chunk) - (size - limit)])
            return b"".join(parts), False
        parts.append(chunk)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), True


@functools.lru_cache(maxsize=1024)
def _url(text: str) -> URL:
    """Target URLs repeat: each is parsed (and quoted) once, not on every request."""
    return URL(text)


@contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except GatewayError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout("the upstream provider timed out", retryable=True) from None
    except aiohttp.ClientConnectorError:
        raise UpstreamError(
            "the upstream provider is unreachable", code="upstream_unreachable", retryable=True
        ) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        raise UpstreamError(
            "the upstream provider closed the connection before the response was complete",
            code="upstream_disconnected",
            retryable=True,
        ) from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            f"the upstream request failed ({type(exc).__name__})",
            code="upstream_error",
            retryable=True,
        ) from None
