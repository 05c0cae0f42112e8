"""OpenAIStream finds the frames that carry usage by searching the block's bytes; the result
must be what splitting the block into frames and checking each gives, whatever the frames."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
from llm_gateway.providers import openai as oa
from llm_gateway.tokens import OutputTally

FRAMES = (
    b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}',
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}',
    b'data: {"choices":[{"delta":{}}], "usage": {"prompt_tokens":1,"completion_tokens":2}}',
    b': a comment "usage":{',
    b'data: {"usage":{not json',
    b"data: [DONE]",
)


def _stream(wants_usage: bool) -> oa.OpenAIStream:
    return oa.OpenAIStream(wants_usage, partial(OutputTally, "cl100k_base"), False)


def _by_split(s: oa.OpenAIStream, out: bytes) -> bytes:
    return b"".join(s._frame(f) if oa._has_usage(f) else f + b"\n\n"
                    for f in out.split(b"\n\n") if f)


@pytest.mark.parametrize("wants_usage", [False, True])
def test_searching_the_block_equals_splitting_it(wants_usage: bool) -> None:
    for n in (1, 2, 3):
        for frames in itertools.product(FRAMES, repeat=n):
            block = b"\n\n".join(frames) + b"\n\n"
            split, searched = _stream(wants_usage), _stream(wants_usage)
            assert searched._parse_usage_frames(block) == _by_split(split, block), block
            assert searched.usage() == split.usage()


@pytest.mark.parametrize("block", [
    b"\n\n" + FRAMES[1] + b"\n\n",  # an empty first frame
    FRAMES[0] + b"\n\n\n\n" + FRAMES[1] + b"\n\n",  # an empty frame between
    FRAMES[0] + b"\n\n\n" + FRAMES[1] + b"\n\n",  # a frame that starts with a newline
])
def test_blocks_with_empty_frames_take_the_split(block: bytes) -> None:
    fed, split = _stream(False), _stream(False)
    assert fed.feed(block) == _by_split(split, block)
    assert fed.usage() == split.usage()
