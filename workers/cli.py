"""`llm-gateway` (and `python -m llm_gateway`, `python -m llm_gateway.workers`): serve,
init-dynamodb, fake-upstream, admin."""

from __future__ import annotations

import argparse
import sys

from llm_gateway.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gateway (configured by environment variables)")
    sub.add_parser("init-dynamodb", help="create the DynamoDB tables if missing (idempotent)")
    sub.add_parser("fake-upstream", help="run the fake OpenAI/Anthropic upstream",
                   add_help=False)
    sub.add_parser("admin", help="manage a running gateway: tenants, keys, models, usage",
                   add_help=False)
    if args[:1] == ["admin"]:
        from llm_gateway.workers.admin_cli import main as admin_main

        admin_main(args[1:])
        return
    if args[:1] == ["fake-upstream"]:
        from llm_gateway.testing.fake_upstream import main as fake_main

        fake_main(args[1:])
        return
    ns = parser.parse_args(args)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"llm-gateway: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if ns.command == "serve":
        from llm_gateway.workers.server import serve

        try:
            serve(settings)
        except SettingsError as exc:
            print(f"llm-gateway: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    elif ns.command == "init-dynamodb":
        _init_dynamodb(settings)


def _init_dynamodb(settings: Settings) -> None:
    import asyncio
    from dataclasses import replace

    from llm_gateway.store.dynamodb import DynamoDBStore

    if not settings.dynamodb_table_name:
        print("llm-gateway: set DYNAMODB_TABLE_NAME", file=sys.stderr)
        raise SystemExit(2)

    async def run() -> None:
        store = DynamoDBStore(replace(settings, create_tables=True))
        await store.start()
        await store.aclose()
        print(f"tables ready: {store.tables.main}, {store.tables.usage}")

    asyncio.run(run())
