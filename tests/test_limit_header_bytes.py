"""`rate_limit_header_bytes` is `rate_limit_headers` in the response's byte form, for every kind
of decision."""

from __future__ import annotations

import itertools

from llm_gateway.limits.base import (
    decide,
    decision,
    rate_limit_header_bytes,
    rate_limit_headers,
)


def test_the_bytes_are_the_headers_encoded() -> None:
    limits = (0, 1, 60, 10**9)
    levels = (-5.5, 0.0, 0.4, 1.0, 59.9, 1e9)
    for rpm, tpm, tokens, r, t in itertools.product(limits, limits, (0, 1, 500, 10**10),
                                                     levels, levels):
        allowed, denied, never, wait, r2, t2 = decide(rpm, tpm, tokens, r, t)
        d = decision(allowed, denied, never, wait, rpm, r2, tpm, t2)
        assert rate_limit_header_bytes(d) == tuple(
            (k.encode(), v.encode()) for k, v in rate_limit_headers(d).items())
