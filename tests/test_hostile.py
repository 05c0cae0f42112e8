"""Issue 12, one test per item: each item's own headline reproduction, end to end against a real
gateway under Granian, a broken upstream played by `tests/hostile_upstream.py`. Each failed on
the code before the issue's fix (3eb902b). The detailed tests of each item are in the area
files named below.

item / test here, then the detailed tests by area file
------------------------------------------------------------------------------------------------
1. admin key never empty: test_item1_empty_admin_key_file_refuses_to_start
  test_hostile_admin    test_a_short_admin_key_file_refuses_to_start
                        test_a_short_admin_key_variable_refuses_to_start
                        test_generated_admin_key_is_logged_by_path_never_printed
                        test_with_admin_key_checks_length
2. no stalled loop: test_item2_huge_one_word_prompt_stalls_no_other_tenant
  test_hostile_counting test_huge_one_word_prompt_does_not_stall_the_worker
                        test_long_stream_without_usage_does_not_stall_the_worker
                        test_dropped_stream_with_huge_prompt_does_not_stall_the_worker
                        test_a_huge_non_stream_reply_without_usage_is_counted_off_the_loop
  test_tokens           test_long_text_counts_exactly_in_pieces
                        test_a_long_run_without_whitespace_costs_linear_time
                        test_output_tally_counts_in_slices_off_the_loop
3. bounded memory: test_item3_long_model_name_and_huge_upstream_body_are_refused
  test_hostile_upstream test_long_model_name_refused_before_lookup_and_messages_stay_short
                        test_name_cache_is_bounded_in_length
                        test_non_stream_body_over_limit_is_502_and_reading_stops
                        test_error_body_is_read_to_64_kib_and_its_message_not_relayed
  test_hostile_counting test_stream_relay_memory_is_bounded
                        test_an_oversized_stream_frame_ends_the_stream
4. no lost record: test_item4_usage_of_1e25_loses_no_record
  test_hostile_ledger   test_upstream_usage_of_1e25_loses_no_record
                        test_route_price_of_1e308_blocks_no_record
                        test_unwritable_spool_loses_no_record
                        test_writer_quarantines_a_poison_record
                        test_writer_writes_a_record_of_infinite_cost
                        test_writer_survives_an_unwritable_spool
                        test_usage_record_is_always_storable
                        test_spill_to_an_unwritable_spool_keeps_the_records
                        test_writer_quarantines_what_dynamodb_refuses
  test_hostile_admin    test_prices_are_finite_and_bounded
                        test_the_highest_price_is_accepted
  test_hostile_counting test_bad_openai_usage_numbers_are_counted_instead
                        test_bad_anthropic_usage_numbers_are_counted_instead
                        test_usage_numbers_are_clamped
                        test_a_stray_frame_never_loses_the_record
                        test_an_internal_error_still_produces_a_record
                        test_an_internal_error_in_a_stream_still_produces_a_record
                        test_a_non_stream_reply_without_usage_counts_its_output
5. secrets stay secret: test_item5_credentials_upstream_secrets_and_redirects_stay_in
  test_hostile_admin    test_base_url_with_credentials_gets_422
                        test_api_key_env_must_name_a_provider_secret
                        test_api_key_env_accepts_provider_secrets
                        test_secret_from_env_refuses_the_gateways_own_variables
                        test_target_name_never_carries_credentials
                        test_stored_credentials_reach_no_tenant_metric_log_or_readyz
                        test_data_dir_and_files_are_private
                        test_files_of_an_older_gateway_are_made_private
                        test_tenant_ids_are_matched_in_full
                        test_route_names_are_matched_in_full
                        test_ids_in_admin_paths_are_matched_in_full
  test_hostile_upstream test_5xx_message_generic_4xx_message_capped
                        test_errors_inside_a_stream_are_not_relayed
                        test_map_error_units
                        test_redirect_is_not_followed
  test_deploy           test_public_listener_forwards_only_the_api_and_health
6. timeouts: test_item6_stalled_request_body_gets_408
  test_hostile_upstream test_non_stream_waits_for_headers_up_to_the_request_timeout
                        test_breaker_counts_a_timed_out_request_once
                        test_stalled_request_body_gets_408
                        test_settings_defaults
7. limiter failure mode: test_item7_redis_oom_fails_open_and_readyz_says_degraded
  test_hostile_limiter  test_error_replies_are_unavailable
                        test_a_reply_no_outage_explains_is_a_fault_under_the_same_policy
                        test_cluster_oom_is_unavailable
                        test_gateway_follows_the_failure_mode_on_error_replies_and_readyz_shows_it
8. trustworthy suite: test_item8_harness_reports_a_failed_child_at_once
  test_hostile_limiter  test_harness_reports_a_failed_child_at_once_with_its_traceback
                        test_exactness_survives_a_redis_stall
  test_limits           test_rpm_exact_across_processes
                        test_tpm_exact_across_processes
                        test_embedded_rpm_exact_across_forked_workers

Helpers come from the area files that import on the code before the fix too (counting,
upstream, limits), so each test here fails on its own assertion there, not at collection.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from llm_gateway.tokens import count_prompt_tokens

from tests import procs
from tests.conftest import gateway_env, gateway_process, redis_process, unique
from tests.hostile_upstream import hostile_upstream, huge_completion, openai_completion
from tests.test_hostile_counting import (
    STALL_BOUND_S,
    body,
    chat,
    model_on,
    records,
    small_reply,
    tenant,
    worst_latency_while,
)
from tests.test_hostile_upstream import SECRET, _chat, _route, stall_body
from tests.test_limits import _admitted

MIB = 2**20


# Item 1 ------------------------------------------------------------------------------------

def _serve_with_key_file(data_dir: Path, content: str) -> tuple[int | None, str, int | None]:
    """`serve` with this `admin_api_key` file and ADMIN_API_KEY unset. Until it exits (or 30 s
    pass), an anonymous POST /admin/tenants is tried. Its exit code (None: it kept running),
    what it wrote, and the anonymous POST's status (None: nothing answered it)."""
    data_dir.mkdir(mode=0o700)
    (data_dir / "admin_api_key").write_text(content)
    port = procs.free_port()
    env = {**os.environ, **gateway_env(data_dir, port)}
    del env["ADMIN_API_KEY"]
    anonymous: int | None = None
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "llm_gateway", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        try:
            while proc.poll() is None and anonymous is None and time.monotonic() < deadline:
                try:
                    anonymous = httpx.post(f"http://127.0.0.1:{port}/admin/tenants", timeout=5,
                                           json={"tenant_id": unique("anon")}).status_code
                except httpx.TransportError:
                    time.sleep(0.05)  # poll interval while it starts, or exits
        finally:
            code = proc.poll()
            if code is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        return code, procs.read_output(out), anonymous


def test_item1_empty_admin_key_file_refuses_to_start(tmp_path: Path) -> None:
    """Before: the gateway started and an anonymous POST /admin/tenants got 201."""
    for name, content in (("empty", ""), ("whitespace", " \n\t \n")):
        data_dir = tmp_path / name
        code, out, anonymous = _serve_with_key_file(data_dir, content)
        assert anonymous is None, f"{name}: an anonymous POST /admin/tenants got {anonymous}"
        assert code == 2, (name, out)
        assert str(data_dir / "admin_api_key") in out, (name, out)


# Item 2 ------------------------------------------------------------------------------------

def test_item2_huge_one_word_prompt_stalls_no_other_tenant(tmp_path: Path) -> None:
    """Before: /healthz and every other tenant on the worker waited 4 s. Now they wait at most
    the issue's 100 ms longer than they do without the attack (STALL_BOUND_S, measured against
    a quiet baseline in the same test, as test_hostile_counting explains)."""
    with hostile_upstream(small_reply) as up, \
            gateway_process(tmp_path, GATEWAY_WORKERS="1") as gw:
        model = model_on(gw, up.openai_base)
        other = (tenant(gw)[1], model)
        tid, key = tenant(gw, tpm_limit=100_000_000)
        huge = body(model, [{"role": "user", "content": "a" * (9 * MIB)}])
        status: list[int] = []
        worst = worst_latency_while(
            gw, lambda: status.append(chat(gw, key, model, huge).status_code),
            lambda: bool(records(gw, tid)), other)
    assert status == [200]
    assert worst < STALL_BOUND_S, f"the worker stalled others for {worst * 1000:.0f} ms more"


# Item 3 ------------------------------------------------------------------------------------

def test_item3_long_model_name_and_huge_upstream_body_are_refused(tmp_path: Path) -> None:
    """Before: a 300-character name was looked up (and cached) and echoed whole in a 404; a
    200 MiB upstream body was relayed, peaking the worker at 756 MiB."""
    with hostile_upstream(lambda request: huge_completion(request, 200)) as up, \
            gateway_process(tmp_path, GATEWAY_WORKERS="1") as gw:
        key = tenant(gw)[1]
        r = _chat(gw, key, "q" * 300)
        assert r.status_code == 400, r.text[:400]
        assert r.json()["error"]["param"] == "model"
        assert "q" * 257 not in r.text
        r = _chat(gw, key, _route(gw, up.openai_base), timeout=120)
        assert r.status_code == 502, (r.status_code, len(r.content))
        assert r.json()["error"]["code"] == "upstream_response_too_large"


# Item 4 ------------------------------------------------------------------------------------

async def usage_of_1e25(request: web.Request) -> web.StreamResponse:
    """prompt_tokens 1e25, as a float on odd prompts and as an integer on even ones."""
    n = int((await request.json())["messages"][0]["content"].split()[-1])
    huge = 1e25 if n % 2 else 10**25
    return web.json_response(openai_completion(
        {"prompt_tokens": huge, "completion_tokens": 2, "total_tokens": huge}))


def test_item4_usage_of_1e25_loses_no_record(tmp_path: Path) -> None:
    """Before: 20 of 21 records were lost (the spool write failed and took the batch)."""
    prompts = {i: [{"role": "user", "content": f"hello {i}"}] for i in range(21)}
    with hostile_upstream(usage_of_1e25) as up, gateway_process(tmp_path) as gw:
        model = model_on(gw, up.openai_base)
        tid, key = tenant(gw)
        with ThreadPoolExecutor(len(prompts)) as pool:  # at once: their records share batches
            replies = list(pool.map(lambda m: chat(gw, key, model, m), prompts.values()))
        assert [r.status_code for r in replies] == [200] * len(prompts)
        expected = {r.headers["x-request-id"]: count_prompt_tokens({"messages": m},
                                                                   "cl100k_base")
                    for r, m in zip(replies, prompts.values(), strict=True)}
        deadline = time.monotonic() + 30
        while len(written := records(gw, tid)) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.1)  # poll interval while the writer drains
    print(f"records written / sent: {len(written)} / {len(expected)}")
    assert {r["request_id"]: r["input_tokens"] for r in written} == expected
    assert {r.get("usage_source") for r in written} == {"counted"}


# Item 5 ------------------------------------------------------------------------------------

async def leaky_500(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": {"message": f"could not connect to {SECRET}",
                                        "type": "server_error"}}, status=500)


async def elsewhere(request: web.Request) -> web.StreamResponse:
    return web.json_response(openai_completion())


def test_item5_credentials_upstream_secrets_and_redirects_stay_in(tmp_path: Path) -> None:
    """Before: a base_url with userinfo was stored (and shown in /readyz, metrics, logs); the
    upstream's `postgres://admin:hunter2@...` reached the tenant; a 307 re-POSTed the prompt to
    another origin."""
    with hostile_upstream(leaky_500) as leaky, hostile_upstream(elsewhere) as other, \
            hostile_upstream(elsewhere) as redirecting, \
            gateway_process(tmp_path, GATEWAY_WORKERS="1") as gw:
        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(f"{other.openai_base}/chat/completions")

        redirecting.behave(redirect)
        port = leaky.url.rsplit(":", 1)[1]
        with gw.admin() as admin:
            r = admin.put(f"/admin/models/{unique('m')}", json={"targets": [{
                "provider": "openai", "base_url": f"http://user:secret@127.0.0.1:{port}/v1",
                "model": "m"}]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == "targets[0].base_url"
        key = tenant(gw)[1]
        r = _chat(gw, key, _route(gw, leaky.openai_base))
        assert r.status_code == 502 and "hunter2" not in r.text, r.text
        r = _chat(gw, key, _route(gw, redirecting.openai_base))
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_redirect", r.text
        assert other.received == []  # the prompt never reached the other origin


# Item 6 ------------------------------------------------------------------------------------

def test_item6_stalled_request_body_gets_408(tmp_path: Path) -> None:
    """Before: an authenticated client held the request open for as long as it liked."""
    with gateway_process(tmp_path, GATEWAY_WORKERS="1", GATEWAY_BODY_READ_TIMEOUT_S="1") as gw:
        reply, waited = stall_body(gw, tenant(gw)[1], wait_s=8)
    assert reply.startswith(b"HTTP/1.1 408"), (reply[:200], f"{waited:.1f} s")
    assert b"request_timeout" in reply
    assert waited < 1 + 3, f"408 after {waited:.1f} s"  # the timeout, and a loaded machine


# Item 7 ------------------------------------------------------------------------------------

def test_item7_redis_oom_fails_open_and_readyz_says_degraded(tmp_path: Path) -> None:
    """Before: every request got 500 while Redis answered OOM, even failing open."""
    with redis_process() as redis, hostile_upstream(small_reply) as up, \
            gateway_process(tmp_path, GATEWAY_WORKERS="1", REDIS_ADDR=redis.addr,
                            GATEWAY_LIMITER_FAILURE_MODE="open") as gw:
        model = model_on(gw, up.openai_base)
        key = tenant(gw, rpm_limit=1000)[1]
        r = chat(gw, key, model)
        assert r.headers["x-ratelimit-limit-requests"] == "1000"  # Redis does the limiting
        redis.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis.cli("CONFIG", "SET", "maxmemory", "1")
        r = chat(gw, key, model)
        ready = httpx.get(f"{gw.url}/readyz", timeout=10)
    assert r.status_code == 200, r.text
    assert ready.status_code == 200, ready.text
    assert ready.json().get("limiter") == "degraded", ready.text


# Item 8 ------------------------------------------------------------------------------------

async def test_item8_harness_reports_a_failed_child_at_once() -> None:
    """Before: a child of the exactness harness that raised was seen only as `queue.Empty`, 30 s
    later, with no word of why; the cause was the 0.25 s production deadline tripping when a
    loaded machine stalled Redis. Here: children that cannot reach Redis fail the harness at
    once with their exit code and traceback; and a Redis stalled for 0.6 s keeps it exact."""
    dead = f"127.0.0.1:{procs.free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as failed:  # ChildFailed; queue.Empty is no assertion
        await _admitted("redis", dead, (unique("dead"), 5, 0, 0), 10)
    took = time.monotonic() - t0
    assert isinstance(failed.value, procs.ChildFailed), repr(failed.value)
    assert took < 15, f"reported after {took:.0f} s"
    assert "exit code 1" in str(failed.value)
    assert "LimiterUnavailable" in str(failed.value)  # the child's own traceback
    with redis_process() as redis:
        n = 20
        os.kill(redis.proc.pid, signal.SIGSTOP)
        resume = threading.Timer(0.6, os.kill, (redis.proc.pid, signal.SIGCONT))
        resume.start()  # the stall's length is the condition under test
        try:
            assert await _admitted("redis", redis.addr, (unique("stall"), n, 0, 0), 3 * n) == n
        finally:
            resume.join()
