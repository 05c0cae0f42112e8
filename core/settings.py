"""The gateway's configuration: one frozen object, built once from the environment at start.

This is the only module that reads environment variables. Every invalid value is reported with
the variable's name, what was given, and what is expected.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """An environment variable holds a value the gateway cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"
    data_dir: Path = Path("data")
    admin_api_key: str | None = None

    redis_addr: str | None = None
    redis_cluster: bool = False
    dynamodb_table_name: str | None = None
    dynamodb_endpoint_url: str | None = None
    dynamodb_usage_table_name: str | None = None
    aws_region: str = "us-east-1"
    create_tables: bool = True
    cache_ttl_s: float = 5.0

    max_body_bytes: int = 10 * 1024 * 1024
    max_json_depth: int = 50
    body_read_timeout_s: float = 30.0

    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 60.0
    stream_idle_timeout_s: float = 60.0
    request_timeout_s: float = 600.0
    max_response_bytes: int = 32 * 1024 * 1024
    max_attempts: int = 4
    retries_per_target: int = 1
    retry_backoff_s: float = 0.1
    max_retry_time_s: float = 30.0
    retry_after_max_s: float = 5.0
    breaker_fail_max: int = 5
    breaker_reset_s: float = 30.0

    usage_queue_max: int = 100_000
    limiter_fail_open: bool = True
    limiter_timeout_s: float = 0.25
    default_max_tokens: int = 4096
    tokenizer_fallback: str = "cl100k_base"

    metrics_enabled: bool = True
    # Traces are exported only when an OTLP endpoint is configured; the OTel SDK reads the
    # OTEL_* variables (endpoint, headers, sampler, batch delays) itself.
    tracing_enabled: bool = False

    @property
    def metrics_dir(self) -> Path:
        """Prometheus' multiprocess directory: per port, so two gateways can share a data dir."""
        return self.data_dir / f"prometheus-{self.port}"

    @property
    def embedded_store(self) -> bool:
        return self.dynamodb_table_name is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = _Env(os.environ if env is None else env)
        d = cls()
        settings = cls(
            host=e.get("GATEWAY_HOST", str, d.host),
            port=e.get("SERVER_PORT", _port, d.port),
            workers=e.get("GATEWAY_WORKERS", _positive_int, os.cpu_count() or 1),
            shutdown_grace_s=e.get("GATEWAY_SHUTDOWN_GRACE_S", _non_negative_float, 30.0),
            log_level=e.get("LOG_LEVEL", _log_level, d.log_level),
            data_dir=e.get("GATEWAY_DATA_DIR", Path, d.data_dir),
            admin_api_key=e.get("ADMIN_API_KEY", _non_empty, None),
            redis_addr=e.get("REDIS_ADDR", _non_empty, None),
            redis_cluster=e.get("REDIS_CLUSTER", _bool, False),
            dynamodb_table_name=e.get("DYNAMODB_TABLE_NAME", _non_empty, None),
            dynamodb_endpoint_url=e.get("DYNAMODB_ENDPOINT_URL", _non_empty, None),
            dynamodb_usage_table_name=e.get("DYNAMODB_USAGE_TABLE_NAME", _non_empty, None),
            aws_region=e.get("AWS_REGION", _non_empty, d.aws_region),
            create_tables=e.get("GATEWAY_CREATE_TABLES", _bool, True),
            cache_ttl_s=e.get("GATEWAY_CACHE_TTL_S", _non_negative_float, 5.0),
            max_body_bytes=e.get("GATEWAY_MAX_BODY_BYTES", _positive_int, d.max_body_bytes),
            max_json_depth=e.get("GATEWAY_MAX_JSON_DEPTH", _positive_int, 50),
            body_read_timeout_s=e.get("GATEWAY_BODY_READ_TIMEOUT_S", _positive_float,
                                      d.body_read_timeout_s),
            connect_timeout_s=e.get("GATEWAY_CONNECT_TIMEOUT_S", _positive_float, 5.0),
            first_byte_timeout_s=e.get("GATEWAY_FIRST_BYTE_TIMEOUT_S", _positive_float, 60.0),
            stream_idle_timeout_s=e.get("GATEWAY_STREAM_IDLE_TIMEOUT_S", _positive_float, 60.0),
            request_timeout_s=e.get("GATEWAY_REQUEST_TIMEOUT_S", _positive_float, 600.0),
            max_response_bytes=e.get("GATEWAY_MAX_RESPONSE_BYTES", _positive_int,
                                     d.max_response_bytes),
            max_attempts=e.get("GATEWAY_MAX_ATTEMPTS", _positive_int, 4),
            retries_per_target=e.get("GATEWAY_RETRIES_PER_TARGET", _non_negative_int, 1),
            retry_backoff_s=e.get("GATEWAY_RETRY_BACKOFF_S", _non_negative_float, 0.1),
            max_retry_time_s=e.get("GATEWAY_MAX_RETRY_TIME_S", _positive_float, 30.0),
            retry_after_max_s=e.get("GATEWAY_RETRY_AFTER_MAX_S", _non_negative_float, 5.0),
            breaker_fail_max=e.get("GATEWAY_BREAKER_FAIL_MAX", _positive_int, 5),
            breaker_reset_s=e.get("GATEWAY_BREAKER_RESET_S", _positive_float, 30.0),
            usage_queue_max=e.get("GATEWAY_USAGE_QUEUE_MAX", _positive_int, 100_000),
            limiter_fail_open=e.get("GATEWAY_LIMITER_FAILURE_MODE", _fail_mode, True),
            limiter_timeout_s=e.get("GATEWAY_LIMITER_TIMEOUT_MS", _positive_int, 250) / 1000,
            default_max_tokens=e.get("GATEWAY_DEFAULT_MAX_TOKENS", _positive_int, 4096),
            tokenizer_fallback=e.get("GATEWAY_TOKENIZER_FALLBACK", _encoding, "cl100k_base"),
            metrics_enabled=e.get("GATEWAY_METRICS", _bool, True),
            tracing_enabled=bool(e.get("OTEL_EXPORTER_OTLP_ENDPOINT", _non_empty, "")
                                 or e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", _non_empty, "")),
        )
        return settings

    def with_admin_key(self) -> tuple[Settings, bool]:
        """On the embedded default, an unset admin key is generated once and kept in the data
        directory. Returns the settings with the key and whether it was generated just now.
        A key shorter than ADMIN_KEY_MIN_CHARS is refused: an empty one would let anyone in."""
        if self.admin_api_key is not None:
            if len(self.admin_api_key.strip()) < ADMIN_KEY_MIN_CHARS:
                raise SettingsError(f"ADMIN_API_KEY is shorter than {ADMIN_KEY_MIN_CHARS} "
                                    "characters")
            return self, False
        if not self.embedded_store:
            raise SettingsError("ADMIN_API_KEY is required when DYNAMODB_TABLE_NAME is set")
        path = self.data_dir / ADMIN_KEY_FILE
        generated = _write_new_key(path, "sk-admin-" + secrets.token_urlsafe(24))
        make_private(path)
        key = path.read_text().strip()
        if len(key) < ADMIN_KEY_MIN_CHARS:
            raise SettingsError(f"{path} holds an admin key shorter than {ADMIN_KEY_MIN_CHARS} "
                                "characters: put a longer one there, or delete the file to have "
                                "one generated")
        return replace(self, admin_api_key=key), generated


ADMIN_KEY_FILE = "admin_api_key"
ADMIN_KEY_MIN_CHARS = 16


def make_private_dir(path: Path) -> None:
    """The data directory: created 0700 (its files hold provider keys in plain text). An
    existing one keeps its mode: an operator may share it on purpose; its files are 0600."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def make_private(path: Path) -> None:
    """Owner-only access to a file the gateway keeps secrets in, if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o600)


def _write_new_key(path: Path, key: str) -> bool:
    """Write `key` to `path` unless the file exists, atomically: a crash leaves no file or the
    whole key. Returns whether it was written. A link, not a rename, so a second gateway starting
    at the same moment keeps the first one's key instead of replacing it."""
    if path.exists():
        return False
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdminClientEnv(NamedTuple):
    """What `llm-gateway admin` reads: where the gateway listens and where its admin key is."""

    port: int
    admin_api_key: str | None
    data_dir: Path


def admin_client_env(env: Mapping[str, str] | None = None) -> AdminClientEnv:
    """Only the CLI's three variables, so an unrelated invalid one does not stop the CLI."""
    e = _Env(os.environ if env is None else env)
    d = Settings()
    return AdminClientEnv(e.get("SERVER_PORT", _port, d.port),
                          e.get("ADMIN_API_KEY", _non_empty, None),
                          e.get("GATEWAY_DATA_DIR", Path, d.data_dir))


class _Env:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise SettingsError(f"{name}={raw!r} is invalid: {exc}") from None


def _non_empty(v: str) -> str:
    return v


def _port(v: str) -> int:
    n = _int(v)
    if not 1 <= n <= 65535:
        raise ValueError("expected a TCP port from 1 to 65535")
    return n


def _int(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _positive_int(v: str) -> int:
    n = _int(v)
    if n < 1:
        raise ValueError("expected a whole number of at least 1")
    return n


def _non_negative_int(v: str) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError("expected a whole number of at least 0")
    return n


def _float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise ValueError("expected a number of seconds") from None


def _positive_float(v: str) -> float:
    f = _float(v)
    if not f > 0:
        raise ValueError("expected a number greater than 0")
    return f


def _non_negative_float(v: str) -> float:
    f = _float(v)
    if not f >= 0:
        raise ValueError("expected a number of at least 0")
    return f


def _bool(v: str) -> bool:
    low = v.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _log_level(v: str) -> str:
    up = v.upper()
    if up not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return up


def _fail_mode(v: str) -> bool:
    low = v.lower()
    if low not in ("open", "closed"):
        raise ValueError("expected 'open' (serve when the limiter is down) or 'closed' (503)")
    return low == "open"


def _encoding(v: str) -> str:
    if v not in ("cl100k_base", "o200k_base"):
        raise ValueError("expected cl100k_base or o200k_base")
    return v


# Variables a route's `api_key_env` may never name: the admin key, and any the gateway itself
# reads (an admin could otherwise point a route at their own server and receive them).
_RESERVED_EXACT = frozenset({"ADMIN_API_KEY", "REDIS_ADDR", "REDIS_CLUSTER", "SERVER_PORT",
                             "LOG_LEVEL"})
_RESERVED_PREFIXES = ("AWS_", "DYNAMODB_", "GATEWAY_", "OTEL_", "PROMETHEUS_", "TIKTOKEN_")
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN")
_ENV_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}")


def provider_secret_name_allowed(name: str) -> bool:
    """Whether a route target's `api_key_env` may name this variable: `*_API_KEY` or `*_TOKEN`,
    and none the gateway reads itself. Compared without case, to be safe."""
    up = name.upper()
    return (_ENV_NAME.fullmatch(name) is not None and up.endswith(_SECRET_SUFFIXES)
            and up not in _RESERVED_EXACT and not up.startswith(_RESERVED_PREFIXES))


def secret_from_env(name: str) -> str | None:
    """A provider key named by a route target's `api_key_env`, read when the target is used so a
    rotated secret is picked up without a restart. A name the admin API would refuse today (a
    route stored before the rule) reads as unset, so the variable is never sent upstream."""
    if not provider_secret_name_allowed(name):
        _warn_refused(name)
        return None
    return os.environ.get(name) or None


@functools.cache
def _warn_refused(name: str) -> None:
    """Once per name and process: it would otherwise repeat on every request of the route."""
    logging.getLogger("llm_gateway").warning(
        "api_key_env names a variable routes may not read; no key is sent",
        extra={"fields": {"api_key_env": name[:128]}})
