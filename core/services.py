"""Everything a worker holds for the request path, built once per worker at start."""

from __future__ import annotations

from dataclasses import dataclass

from llm_gateway.breakers import Breakers
from llm_gateway.catalog import Catalog
from llm_gateway.limits import Limiter
from llm_gateway.providers.base import Provider
from llm_gateway.settings import Settings
from llm_gateway.store.base import Store
from llm_gateway.upstream import UpstreamClient
from llm_gateway.usage import UsageSink


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    catalog: Catalog
    limiter: Limiter
    upstream: UpstreamClient
    translators: dict[tuple[str, str], Provider]  # (client wire, provider name) -> translator
    usage: UsageSink
    breakers: Breakers
