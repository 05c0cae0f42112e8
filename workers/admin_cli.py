"""`llm-gateway admin`: tenants, keys, model routes and usage of a running gateway, over its admin
API with httpx's client.

Each command is one request (`_Admin.call`) and a renderer: a readable text by default, the
gateway's JSON with `--json`. Failures end in `AdminError` and exit 1 with one line on stderr:
`error: <status> <code>: <message>` for an answer from the gateway, a plain sentence when the
gateway cannot be reached. Usage errors exit 2 (argparse). The admin key is never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from llm_gateway.settings import SettingsError, admin_client_env

_TIMEOUT_S = 30.0
_TARGET_KEYS = ("provider", "base_url", "model", "api_key", "api_key_env", "weight")


class AdminError(Exception):
    """A command failed; the message is the whole line shown to the operator."""


class _Admin:
    """One gateway, one admin key: sends a request and returns its JSON, or raises AdminError."""

    def __init__(self, url: str, admin_key: str) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=_TIMEOUT_S,
                                    headers={"X-Admin-Key": admin_key})

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, path: str, *, body: Any = None,
             params: dict[str, str] | None = None) -> Any:
        content = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        with self._transport_errors():
            r = self._client.request(method, path, content=content, params=params,
                                     headers=headers)
        if r.is_success:
            return r.json()
        raise AdminError(_error_line(r))

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        """httpx's exceptions become one sentence here, the only place that calls httpx."""
        try:
            yield
        except httpx.ConnectError:
            raise AdminError(f"error: cannot connect to the gateway at {self.url}"
                             " (is it running? pass --url or set SERVER_PORT)") from None
        except httpx.TimeoutException:
            raise AdminError(f"error: the gateway at {self.url} did not answer within"
                             f" {_TIMEOUT_S:g} s") from None
        except httpx.TransportError as exc:
            raise AdminError(f"error: talking to {self.url}: {exc}") from None


def _error_line(r: httpx.Response) -> str:
    try:
        err = r.json()["error"]
        return f"error: {r.status_code} {err.get('code') or err.get('type')}: {err['message']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"error: {r.status_code} {r.reason_phrase}: {r.text[:200]}"


def _seg(value: str) -> str:
    """A path segment: model names may hold `/` (`meta-llama/Llama-3`)."""
    return quote(value, safe="")


# Commands: each sends its request and returns (the gateway's JSON, the text for a person).
Result = tuple[Any, str]


def tenants_create(a: _Admin, ns: argparse.Namespace) -> Result:
    body: dict[str, Any] = {"tenant_id": ns.tenant, **_tenant_fields(ns)}
    if ns.api_key:
        body["api_key"] = ns.api_key
    data = a.call("POST", "/admin/tenants", body=body)
    text = (f"created tenant {data['tenant_id']} ({_limits_text(data)})\n"
            + _pairs([("key_id", data["key_id"]),
                      ("api_key", f"{data['api_key']}  (shown once: store it now)")]))
    return data, text


def tenants_list(a: _Admin, ns: argparse.Namespace) -> Result:
    data = a.call("GET", "/admin/tenants")
    rows = [[t["tenant_id"], _yes(t["enabled"]), _limit_text(t["rpm_limit"]),
             _limit_text(t["tpm_limit"]), ",".join(t["allowed_models"]),
             _time(t["created_at"])] for t in data["data"]]
    return data, _table(["TENANT", "ENABLED", "RPM", "TPM", "MODELS", "CREATED"], rows, {2, 3})


def tenants_show(a: _Admin, ns: argparse.Namespace) -> Result:
    t = a.call("GET", f"/admin/tenants/{_seg(ns.tenant)}")
    text = _pairs([("tenant", t["tenant_id"]), ("enabled", _yes(t["enabled"])),
                   ("rpm_limit", _limit_text(t["rpm_limit"])),
                   ("tpm_limit", _limit_text(t["tpm_limit"])),
                   ("models", ",".join(t["allowed_models"])),
                   ("created", _time(t["created_at"]))])
    keys = [[k["key_id"], k["prefix"], _time(k["created_at"])] for k in t.get("keys", [])]
    return t, f"{text}\n\nkeys:\n{_table(['KEY_ID', 'PREFIX', 'CREATED'], keys)}"


def tenants_update(a: _Admin, ns: argparse.Namespace) -> Result:
    body = _tenant_fields(ns)
    if not body:
        raise AdminError("error: nothing to change: give --rpm, --tpm, --models, --enable"
                         " or --disable")
    t = a.call("PATCH", f"/admin/tenants/{_seg(ns.tenant)}", body=body)
    return t, f"updated tenant {t['tenant_id']} ({_limits_text(t)})"


def tenants_delete(a: _Admin, ns: argparse.Namespace) -> Result:
    data = a.call("DELETE", f"/admin/tenants/{_seg(ns.tenant)}")
    return data, f"deleted tenant {ns.tenant} and its keys"


def keys_create(a: _Admin, ns: argparse.Namespace) -> Result:
    body = {"api_key": ns.api_key} if ns.api_key else {}
    data = a.call("POST", f"/admin/tenants/{_seg(ns.tenant)}/keys", body=body)
    text = _pairs([("tenant", data["tenant_id"]), ("key_id", data["key_id"]),
                   ("api_key", f"{data['api_key']}  (shown once: store it now)")])
    return data, text


def keys_revoke(a: _Admin, ns: argparse.Namespace) -> Result:
    data = a.call("DELETE", f"/admin/tenants/{_seg(ns.tenant)}/keys/{_seg(ns.key_id)}")
    return data, f"revoked key {ns.key_id} of tenant {ns.tenant}"


def models_put(a: _Admin, ns: argparse.Namespace) -> Result:
    body = _route_file(ns.file) if ns.file else {"targets": ns.target}
    if ns.input_price is not None:
        body["input_price_per_mtok"] = ns.input_price
    if ns.output_price is not None:
        body["output_price_per_mtok"] = ns.output_price
    r = a.call("PUT", f"/admin/models/{_seg(ns.name)}", body=body)
    return r, f"model {r['name']}:\n{_route_text(r)}"


def models_list(a: _Admin, ns: argparse.Namespace) -> Result:
    data = a.call("GET", "/admin/models")
    rows = []
    for r in data["data"]:
        for i, t in enumerate(r["targets"]):
            first = i == 0
            rows.append([r["name"] if first else "", str(i + 1), t["provider"], t["model"],
                         t["base_url"], _key_source(t),
                         _price(r["input_price_per_mtok"]) if first else "",
                         _price(r["output_price_per_mtok"]) if first else ""])
    headers = ["MODEL", "#", "PROVIDER", "UPSTREAM_MODEL", "BASE_URL", "KEY", "IN_$/MTOK",
               "OUT_$/MTOK"]
    return data, _table(headers, rows, {1, 6, 7})


def models_delete(a: _Admin, ns: argparse.Namespace) -> Result:
    data = a.call("DELETE", f"/admin/models/{_seg(ns.name)}")
    return data, f"deleted model {ns.name}"


def usage(a: _Admin, ns: argparse.Namespace) -> Result:
    params = {k: str(v) for k, v in (("from", ns.start), ("to", ns.end), ("model", ns.model),
                                     ("limit", ns.limit), ("cursor", ns.cursor)) if v is not None}
    data = a.call("GET", f"/admin/tenants/{_seg(ns.tenant)}/usage", params=params)
    tot = data["totals"]
    totals = _table(["REQUESTS", "INPUT_TOKENS", "OUTPUT_TOKENS", "COST_$"],
                    [[str(tot["requests"]), str(tot["input_tokens"]), str(tot["output_tokens"]),
                      _price(tot["cost"])]], {0, 1, 2, 3})
    rows = [[_time(u["started_at"]), u["model"], u.get("provider") or "-", str(u["status"]),
             str(u["input_tokens"]), str(u["output_tokens"]), _price(u["cost"]),
             f"{u['latency_ms']:.1f}", u["request_id"]] for u in data["data"]]
    records = _table(["STARTED", "MODEL", "PROVIDER", "STATUS", "IN", "OUT", "COST_$",
                      "LATENCY_MS", "REQUEST_ID"], rows, {3, 4, 5, 6, 7})
    text = f"tenant {data['tenant_id']}: totals\n{totals}\n\nrecords:\n{records}"
    if data.get("next_cursor"):
        text += f"\n\nmore: --cursor {data['next_cursor']}"
    return data, text


def _tenant_fields(ns: argparse.Namespace) -> dict[str, Any]:
    """The tenant fields given on the command line (absent flags are not sent)."""
    names = {"rpm": "rpm_limit", "tpm": "tpm_limit", "models": "allowed_models",
             "enabled": "enabled"}
    given = vars(ns)
    return {field: given[flag] for flag, field in names.items() if flag in given}


def _route_file(name: str) -> dict[str, Any]:
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        body = orjson.loads(raw)
    except OSError as exc:
        raise AdminError(f"error: cannot read {name}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise AdminError(f"error: {name} is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise AdminError(f"error: {name} must hold a JSON object with 'targets'")
    return body


# Rendering for people.

def _table(headers: Sequence[str], rows: Sequence[Sequence[str]],
           right: set[int] | frozenset[int] = frozenset()) -> str:
    """Aligned columns; the columns in `right` (numbers) are right-aligned."""
    if not rows:
        return "(none)"
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return "\n".join(line(r) for r in [headers, *rows])


def _pairs(items: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in items)


def _route_text(r: dict[str, Any]) -> str:
    rows = [[str(i + 1), t["provider"], t["model"], t["base_url"], _key_source(t),
             str(t["weight"] or "")] for i, t in enumerate(r["targets"])]
    prices = (f"price per million tokens: input ${_price(r['input_price_per_mtok'])},"
              f" output ${_price(r['output_price_per_mtok'])}")
    table = _table(["#", "PROVIDER", "UPSTREAM_MODEL", "BASE_URL", "KEY", "WEIGHT"], rows, {0})
    return f"{table}\n{prices}"


def _key_source(t: dict[str, Any]) -> str:
    if t.get("api_key_env"):
        return f"${t['api_key_env']}"
    return "set" if t.get("api_key_set") else "-"


def _limits_text(t: dict[str, Any]) -> str:
    return (f"rpm {_limit_text(t['rpm_limit'])}, tpm {_limit_text(t['tpm_limit'])},"
            f" models {','.join(t['allowed_models'])}, {'enabled' if t['enabled'] else 'disabled'}")


def _limit_text(v: int | None) -> str:
    return "unlimited" if v is None else str(v)


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def _price(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".") if v else "0"


def _time(unix_s: float | None) -> str:
    if unix_s is None:
        return "-"
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Argument types: a bad value is a usage error (exit 2) before anything is sent.

def _limit_arg(v: str) -> int | None:
    if v.lower() in ("none", "unlimited"):
        return None
    n = int(v) if v.isdigit() else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: expected a positive whole number or 'none'")
    return n


def _models_arg(v: str) -> list[str]:
    models = [m.strip() for m in v.split(",") if m.strip()]
    if not models:
        raise argparse.ArgumentTypeError("expected model names separated by commas, or '*'")
    return models


def _target_arg(v: str) -> dict[str, Any]:
    """`provider=openai,base_url=https://...,model=gpt-4o,api_key_env=OPENAI_API_KEY`."""
    target: dict[str, Any] = {}
    for part in v.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _TARGET_KEYS:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected key=value with key one of {', '.join(_TARGET_KEYS)}")
        target[key] = int(value) if key == "weight" and value.isdigit() else value.strip()
    return target


def _price_arg(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r}: expected dollars per million tokens") from None
    if f < 0:
        raise argparse.ArgumentTypeError(f"{v!r}: a price cannot be negative")
    return f


# The command line.

Command = Callable[[_Admin, argparse.Namespace], Result]


def _common() -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand (defaults filled in `main`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=argparse.SUPPRESS,
                   help="the gateway (default http://127.0.0.1:$SERVER_PORT, port 8080)")
    p.add_argument("--admin-key", default=argparse.SUPPRESS, metavar="KEY",
                   help="default: $ADMIN_API_KEY, else the file $GATEWAY_DATA_DIR/admin_api_key")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the gateway's JSON answer instead of text")
    return p


def _tenant_options(p: argparse.ArgumentParser, create: bool) -> None:
    unset = " (default: unlimited)" if create else ", or 'none' for no limit"
    p.add_argument("--rpm", type=_limit_arg, default=argparse.SUPPRESS, metavar="N",
                   help=f"requests per minute{unset}")
    p.add_argument("--tpm", type=_limit_arg, default=argparse.SUPPRESS, metavar="N",
                   help=f"tokens per minute{unset}")
    every = " (default: '*', every model)" if create else ", or '*' for every model"
    p.add_argument("--models", type=_models_arg, default=argparse.SUPPRESS, metavar="A,B",
                   help=f"allowed model names, comma-separated{every}")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="llm-gateway admin", parents=[common],
                                     description="Manage a running gateway over its admin API.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def leaf(sub: Any, name: str, fn: Command, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=help_,
                                                    description=help_)
        p.set_defaults(fn=fn)
        return p

    tenants = groups.add_parser("tenants", help="create, list, show, update, delete tenants")
    tsub = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(tsub, "create", tenants_create, "create a tenant and print its key (once)")
    p.add_argument("tenant")
    p.add_argument("--api-key", help="the tenant's key (default: generated)")
    _tenant_options(p, create=True)
    leaf(tsub, "list", tenants_list, "list tenants")
    leaf(tsub, "show", tenants_show, "one tenant with its key ids").add_argument("tenant")
    p = leaf(tsub, "update", tenants_update, "change limits, models, or suspend a tenant")
    p.add_argument("tenant")
    _tenant_options(p, create=False)
    onoff = p.add_mutually_exclusive_group()
    onoff.add_argument("--enable", dest="enabled", action="store_const", const=True,
                       default=argparse.SUPPRESS, help="resume a suspended tenant")
    onoff.add_argument("--disable", dest="enabled", action="store_const", const=False,
                       default=argparse.SUPPRESS, help="suspend: its keys get 401 at once")
    leaf(tsub, "delete", tenants_delete, "delete a tenant and its keys").add_argument("tenant")

    keys = groups.add_parser("keys", help="create or revoke a tenant's keys")
    ksub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(ksub, "create", keys_create, "another key for a tenant (rotation), printed once")
    p.add_argument("tenant")
    p.add_argument("--api-key", help="the key (default: generated)")
    p = leaf(ksub, "revoke", keys_revoke, "revoke one key")
    p.add_argument("tenant")
    p.add_argument("key_id")

    models = groups.add_parser("models", help="put, list, delete model routes")
    msub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(msub, "put", models_put, "create or replace a model route")
    p.add_argument("name", help="the model name clients send")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", type=_target_arg, action="append", metavar="SPEC",
                     help="provider=...,base_url=...,model=...[,api_key_env=...][,weight=N];"
                          " repeat in failover order")
    src.add_argument("--file", metavar="PATH",
                     help="a JSON route body ('-' for stdin), as PUT /admin/models takes")
    p.add_argument("--input-price", type=_price_arg, metavar="USD",
                   help="dollars per million input tokens")
    p.add_argument("--output-price", type=_price_arg, metavar="USD",
                   help="dollars per million output tokens")
    leaf(msub, "list", models_list, "list model routes (provider keys never shown)")
    leaf(msub, "delete", models_delete, "delete a model route").add_argument("name")

    p = leaf(groups, "usage", usage, "a tenant's usage: totals, then records")
    p.add_argument("tenant")
    p.add_argument("--from", dest="start", metavar="TIME", help="ISO 8601 time or unix seconds")
    p.add_argument("--to", dest="end", metavar="TIME", help="ISO 8601 time or unix seconds")
    p.add_argument("--model", help="only this model")
    p.add_argument("--limit", type=int, metavar="N", help="records per page, 1-1000 (default 100)")
    p.add_argument("--cursor", help="the next page, as printed after a full page")
    return parser


def _admin_key(ns: argparse.Namespace, env_key: str | None, data_dir: Path) -> str:
    if getattr(ns, "admin_key", None):
        return str(ns.admin_key)
    if env_key:
        return env_key
    path = data_dir / "admin_api_key"
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise AdminError(f"error: cannot read {path}: {exc.strerror}") from None
    if not key:
        raise AdminError(f"error: no admin key: pass --admin-key, set ADMIN_API_KEY, or run"
                         f" where {path} exists")
    return key


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        env = admin_client_env()
    except SettingsError as exc:
        print(f"llm-gateway admin: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    url = getattr(ns, "url", None) or f"http://127.0.0.1:{env.port}"
    try:
        admin = _Admin(url, _admin_key(ns, env.admin_api_key, env.data_dir))
        try:
            data, text = ns.fn(admin, ns)
        finally:
            admin.close()
    except AdminError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None
    if getattr(ns, "json", False):
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
