"""The benchmark's pure helpers: its traffic must be what the service accepts, and its reports must add up.

No timing here: the benchmark itself (``make bench``) measures; these tests only check its inputs and sums.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report, wrkcheck
from bench.procstat import tree_cpu_seconds
from bench.traffic import generate, http_request, make_tenants, read_pool, write_pool
from service.models import Event
from service.payloads import parse_body
from service.signature import find_verifying_token, matches, parse_header

TENANTS = make_tenants(realms=20, tokens=3, seed=7)
TOKEN_OF = {tenant.realm_id: tenant.token for tenant in TENANTS}


def test_tenants_share_a_handful_of_tokens() -> None:
    assert len({t.realm_id for t in TENANTS}) == 20
    assert len({t.token for t in TENANTS}) == 3
    assert all(t.realm_id.isdigit() and int(t.realm_id) > 2**53 for t in TENANTS)


def test_every_delivery_verifies_with_the_token_of_each_realm_it_names() -> None:
    for delivery in generate(200, TENANTS, seed=7):
        signature = parse_header([delivery.signature])
        parsed = parse_body(delivery.body)
        realms = parsed.realm_ids()
        assert realms <= TOKEN_OF.keys()
        tokens = {TOKEN_OF[realm] for realm in realms}
        assert len(tokens) == 1  # one app's token signs the whole body, so no event is a token_mismatch
        assert matches(tokens.pop(), delivery.body, signature)
        assert find_verifying_token(sorted(set(TOKEN_OF.values())), delivery.body, signature) is not None


def test_events_are_unique_valid_and_counted() -> None:
    deliveries = list(generate(300, TENANTS, seed=7))
    ids: list[str] = []
    for delivery in deliveries:
        parsed = parse_body(delivery.body)
        assert parsed.format == delivery.format
        assert len(parsed.items) == delivery.events
        events = [item for item in parsed.items if isinstance(item, Event)]
        assert len(events) == delivery.events  # nothing the service would dead-letter as invalid_event
        ids.extend(event.event_id for event in events)
    assert len(ids) == len(set(ids)) == sum(d.events for d in deliveries)
    formats = {d.format for d in deliveries}
    assert formats == {"legacy", "cloudevents"}
    assert {d.events for d in deliveries if d.format == "cloudevents"} == {1, 2, 3, 4, 5}
    assert all(d.events == 1 for d in deliveries if d.format == "legacy")


def test_generation_is_deterministic() -> None:
    first = [d.body for d in generate(20, TENANTS, seed=3)]
    assert first == [d.body for d in generate(20, TENANTS, seed=3)]
    assert first != [d.body for d in generate(20, TENANTS, seed=4)]


def test_raw_requests_round_trip_through_the_pool_file(tmp_path: Path) -> None:
    deliveries = list(generate(10, TENANTS, seed=7))
    requests = [http_request(d, "/webhooks/quickbooks") for d in deliveries]
    assert write_pool(tmp_path / "pool.bin", requests) == 10
    assert read_pool(tmp_path / "pool.bin") == requests
    head, _, body = requests[0].partition(b"\r\n\r\n")
    assert body == deliveries[0].body
    assert f"content-length: {len(body)}".encode() in head.split(b"\r\n")
    assert f"intuit-signature: {deliveries[0].signature}".encode() in head.split(b"\r\n")


def test_wrk_script_carries_the_body_and_signature() -> None:
    delivery = next(generate(1, TENANTS, seed=7))
    script = wrkcheck.lua_script(http_request(delivery, "/webhooks/quickbooks"))
    assert 'wrk.method = "POST"' in script
    assert delivery.body.decode() in script
    assert f'wrk.headers["intuit-signature"] = "{delivery.signature}"' in script
    assert "content-length" not in script


WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8000/webhooks/quickbooks
  Latency Distribution
     50%    5.58ms
     90%  950.00us
     99%    1.20s
  104012 requests in 10.08s, 15.38MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  10319.40
"""


def test_wrk_output_is_parsed() -> None:
    parsed = wrkcheck.parse_output(WRK_OUTPUT)
    assert parsed["requests_per_second"] == pytest.approx(10319.40)
    assert parsed["latency_ms"] == pytest.approx({"p50": 5.58, "p90": 0.95, "p99": 1200.0})
    assert parsed["non_2xx"] == 4
    assert parsed["socket_errors"] == 3


def test_redis_commands_are_counted_per_accepted_request_without_info() -> None:
    side = {
        "commandstats": {"evalsha": 10, "set": 300, "xadd": 300, "info": 2},
        "window": {"statuses": {"200": 100}},
        "total": {"statuses": {"200": 120, "503": 2, "0": 1}, "unanswered": 1},
    }
    assert report.redis_per_request(side) == (6.1, 0.1)
    assert report.non_200(side) == 4


def test_cpu_time_of_this_process_is_readable() -> None:
    assert tree_cpu_seconds(os.getpid()) > 0


_FORK_AND_REAP = """
import os, sys, time
pid = os.fork()
if pid == 0:
    end = time.process_time() + 0.4
    while time.process_time() < end:
        pass
    os._exit(0)
os.waitpid(pid, 0)
print("reaped", flush=True)
sys.stdin.read()
"""


def test_cpu_time_of_a_child_that_ended_counts_for_its_parent() -> None:
    # redis-server's AOF rewrite is a child that ends within the window: its CPU must not show up as "other".
    with subprocess.Popen(
        [sys.executable, "-c", _FORK_AND_REAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            assert parent.stdout.readline().strip() == "reaped"
            assert tree_cpu_seconds(parent.pid) >= 0.35
        finally:
            parent.kill()


def measured_side(rate: float, *, lost: int = 0) -> dict[str, object]:
    """One side's figures as the harness records them (only what the report reads)."""
    return {
        "ok_per_second": rate,
        "latency_ms": {"p50": 3.0, "p99": 9.0},
        "cpu_busy": {"server": 1.0, "load": 0.5, "redis": 0.3},
        "other_cpu": 0.0,
        "commandstats": {"evalsha": 10, "info": 2},
        "window": {"statuses": {"200": 1000}},
        "total": {"statuses": {"200": 1200}, "unanswered": 0},
        "check": {
            "accepted_in_200s": 1500,
            "new_stream_entries": 1500 - lost,
            "distinct_event_ids": 1500 - lost,
            "new_dead_letters": 0,
            "ok": lost == 0,
        },
        "pool_wrapped": False,
    }


def test_the_table_shows_the_median_round_and_checks_every_round() -> None:
    from bench.harness import median_round

    rounds = [
        {"bare": measured_side(10000), "service": measured_side(7000)},  # 0.70
        {"bare": measured_side(10000), "service": measured_side(5000, lost=1)},  # 0.50
        {"bare": measured_side(12000), "service": measured_side(7200)},  # 0.60: the median
    ]
    assert median_round(rounds) is rounds[2]
    options = {"workers": 1, "connections": 64, "duration": 10, "warmup": 2, "realms": 200, "tokens": 20}
    result = {"options": options, "pinning": "-", "rounds": rounds, **median_round(rounds)}
    table = report.format_table(result)
    assert "B/A = 0.60" in table
    assert [line for line in table.splitlines() if line[:4] in ("  1:", "  2:", "  3:")] == [
        "  1: A 10000/s p99 9.00 ms, B 7000/s p99 9.00 ms, B/A 0.70",
        "  2: A 10000/s p99 9.00 ms, B 5000/s p99 9.00 ms, B/A 0.50",
        "  3: A 12000/s p99 9.00 ms, B 7200/s p99 9.00 ms, B/A 0.60",
    ]
    verdicts = [line.rsplit("-> ", 1)[1] for line in table.splitlines() if line.startswith("count check")]
    assert verdicts == ["OK: 0 lost, 0 duplicated", "MISMATCH", "OK: 0 lost, 0 duplicated"]


def test_an_even_number_of_rounds_shows_the_lower_middle_one() -> None:
    from bench.harness import median_round

    rounds = [{"service": measured_side(rate)} for rate in (900, 700, 800, 600)]
    assert median_round(rounds)["service"]["ok_per_second"] == 700
