"""One circuit breaker per upstream target, per worker process (pybreaker).

pybreaker's `call_async` needs tornado and its plain `call` never sees an async failure, so a
request's attempts on a target (its retries included) run inside one `calling()` context
manager: a request counts at most one failure per target, however many retries it made.
pybreaker lets every concurrent caller through in half-open state; here only one request probes
while the others skip the target.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pybreaker
from llm_gateway import observability as obs
from llm_gateway.errors import GatewayError

STATE_VALUE = {"closed": 0, "half-open": 1, "open": 2}


def _not_a_target_failure(exc: BaseException) -> bool:
    """Only what says the target is unhealthy counts: connection errors, timeouts, 5xx.
    A 4xx (bad request, or the upstream rate-limiting us) says nothing about its health."""
    return not (isinstance(exc, GatewayError) and exc.retryable and exc.status != 429)


class _StateGauge(pybreaker.CircuitBreakerListener):
    """Keeps `llm_gateway_circuit_state{target}` in step with the breaker."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        obs.circuit_state(str(cb.name), STATE_VALUE.get(new_state.name, 0))


_STATE_GAUGE = _StateGauge()


class TargetBreaker:
    def __init__(self, name: str, fail_max: int, reset_s: float) -> None:
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_s,
            exclude=[_not_a_target_failure],
            throw_new_error_on_trip=False,
            name=name,
            listeners=[_STATE_GAUGE],
        )
        self._probing = False
        obs.circuit_state(name, STATE_VALUE["closed"])

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    def available(self) -> bool:
        """False while another request is probing a target that is not closed."""
        return not self._probing or self.state == "closed"

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Run one request's attempts on this target under the breaker, as one call. Raises
        pybreaker.CircuitBreakerError at once, without running the block, while it is open."""
        probe = self.state != "closed"
        if probe:
            self._probing = True
        try:
            with self._cb.calling():
                yield
        finally:
            if probe:
                self._probing = False


class Breakers:
    def __init__(self, fail_max: int, reset_s: float) -> None:
        self._fail_max = fail_max
        self._reset_s = reset_s
        self._by_target: dict[str, TargetBreaker] = {}

    def for_target(self, name: str) -> TargetBreaker:
        breaker = self._by_target.get(name)
        if breaker is None:
            breaker = self._by_target[name] = TargetBreaker(name, self._fail_max, self._reset_s)
        return breaker

    def states(self) -> dict[str, str]:
        return {name: b.state for name, b in self._by_target.items()}
