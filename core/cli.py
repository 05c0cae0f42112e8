"""`llm-gateway` (and `python -m llm_gateway`): serve, fake-upstream."""

from __future__ import annotations

import argparse
import sys

from llm_gateway.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gateway (configured by environment variables)")
    sub.add_parser("fake-upstream", help="run the fake OpenAI/Anthropic upstream",
                   add_help=False)
    if args[:1] == ["fake-upstream"]:
        from llm_gateway.workers.fake_upstream import main as fake_main

        fake_main(args[1:])
        return
    ns = parser.parse_args(args)
    if ns.command == "serve":
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            print(f"llm-gateway: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        from llm_gateway.workers.server import serve

        serve(settings)
