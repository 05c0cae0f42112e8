"""Where tenants, keys, routes and the usage ledger live: embedded (SQLite in the data
directory) or DynamoDB, behind `base.Store`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_gateway.settings import Settings
    from llm_gateway.store.base import Store


def make_store(settings: Settings) -> Store:
    """The embedded store unless DynamoDB is configured (each imports only its own library)."""
    if settings.embedded_store:
        from llm_gateway.store.embedded import EmbeddedStore

        return EmbeddedStore(settings.data_dir)
    from llm_gateway.store.dynamodb import DynamoDBStore

    return DynamoDBStore(settings)
