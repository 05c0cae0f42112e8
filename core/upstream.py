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
from llm_gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from llm_gateway.providers.base import UpstreamRequest
from llm_gateway.settings import Settings
from yarl import URL


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

    async def send(self, req: UpstreamRequest) -> aiohttp.ClientResponse:
        """POST and wait for the response headers, within the first-byte timeout."""
        assert self._session is not None, "upstream client not started"
        with translate_errors():
            async with asyncio.timeout(self._settings.first_byte_timeout_s):
                return await self._session.post(_url(req.url), data=req.body,
                                                headers=req.headers)

    async def read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        with translate_errors():
            async with asyncio.timeout(self._settings.request_timeout_s):
                return await resp.read()

    async def read_first(self, resp: aiohttp.ClientResponse) -> bytes:
        """The first chunk of a stream, within the first-byte timeout (before any byte has gone to
        the client, so a failure here may still be retried elsewhere)."""
        with translate_errors():
            async with asyncio.timeout(self._settings.first_byte_timeout_s):
                return await resp.content.readany()

    @staticmethod
    async def chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        with translate_errors():
            async for chunk in resp.content.iter_any():
                yield chunk


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
