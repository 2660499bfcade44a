"""The benchmark's compact table, from the result ``bench/harness.py`` also writes as JSON."""

from __future__ import annotations

from typing import Any

OTHER_CPU_WARNING = 0.10  # of one core; about 0.01 on a quiet machine
SCRIPT_COMMANDS = ("evalsha", "eval", "fcall", "evalsha_ro", "eval_ro", "fcall_ro")


def non_200(side: dict[str, Any]) -> int:
    """Answers other than 200 over the whole run (warm-up and drain too), plus requests that got none."""
    statuses: dict[str, int] = side["total"]["statuses"]
    return sum(n for status, n in statuses.items() if status != "200") + int(side["total"]["unanswered"])


def redis_per_request(side: dict[str, Any]) -> tuple[float, float]:
    """Redis commands (all, including those a script runs; INFO excluded) and script calls per 200 answer."""
    stats: dict[str, int] = side.get("commandstats", {})
    ok = side["window"]["statuses"].get("200", 0)
    if not stats or not ok:
        return 0.0, 0.0
    total = sum(n for name, n in stats.items() if name != "info")
    scripts = sum(n for name, n in stats.items() if name in SCRIPT_COMMANDS)
    return total / ok, scripts / ok


def _row(label: str, side: dict[str, Any]) -> str:
    cpu = side["cpu_busy"]
    redis_cpu = f"{cpu['redis']:.0%}" if "redis" in cpu else "-"
    return (
        f"{label:<22}{side['ok_per_second']:>9.0f}{side['latency_ms']['p50']:>9.2f}{side['latency_ms']['p99']:>9.2f}"
        f"{non_200(side):>9d}{cpu['server']:>9.0%}{cpu['load']:>7.0%}{redis_cpu:>7}{side['other_cpu']:>7.0%}"
    )


def _round_line(measured: dict[str, Any]) -> str:
    parts = []
    for label, name in (("A", "bare"), ("B", "service")):
        if name in measured:
            side = measured[name]
            parts.append(f"{label} {side['ok_per_second']:.0f}/s p99 {side['latency_ms']['p99']:.2f} ms")
    if "bare" in measured and "service" in measured:
        parts.append(f"B/A {measured['service']['ok_per_second'] / measured['bare']['ok_per_second']:.2f}")
    return ", ".join(parts)


def format_table(result: dict[str, Any]) -> str:
    options = result["options"]
    lines = [
        f"workers={options['workers']} connections={options['connections']} duration={options['duration']:g}s "
        f"warm-up={options['warmup']:g}s realms={options['realms']} tokens={options['tokens']}",
        f"pinning: {result['pinning']}",
        f"service modules: {result.get('service_modules', 'not recorded')}",
        f"{'':<22}{'200/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-200':>9}"
        f"{'cpu srv':>9}{'load':>7}{'redis':>7}{'other':>7}",
    ]
    bare, service = result.get("bare"), result.get("service")
    if bare:
        lines.append(_row("(A) bare Starlette", bare))
    wrk = result.get("bare_wrk")
    if wrk and "error" not in wrk:
        lines.append(
            f"{'(A) bare, wrk driving':<22}{wrk['requests_per_second']:>9.0f}"
            f"{wrk['latency_ms'].get('p50', 0):>9.2f}{wrk['latency_ms'].get('p99', 0):>9.2f}"
            f"{wrk['non_2xx'] + wrk['socket_errors']:>9d}{'-':>9}{'-':>7}{'-':>7}{wrk['other_cpu']:>7.0%}"
        )
    if service:
        lines.append(_row("(B) service", service))
    rounds: list[dict[str, Any]] = result.get("rounds", [])
    if len(rounds) > 1:
        lines.append(f"rounds (A then B, alternating; the rows above are the median round, by B/A): {len(rounds)}")
        lines.extend(f"  {n}: {_round_line(measured)}" for n, measured in enumerate(rounds, 1))
    if bare and service:
        lines.append(f"B/A = {service['ok_per_second'] / bare['ok_per_second']:.2f}")
    for label, side in (("(A)", bare), ("(A) with wrk", wrk), ("(B)", service)):
        if side and side["other_cpu"] > OTHER_CPU_WARNING:
            lines.append(
                f"warning: {label}: other processes and the kernel used {side['other_cpu']:.0%} of a core during the "
                "window; the machine was not quiet, rerun before trusting these figures"
            )
    if service:
        commands, scripts = redis_per_request(service)
        breakdown = ", ".join(f"{name} {n}" for name, n in service["commandstats"].items() if name != "info")
        lines.append(f"Redis commands per accepted request: {commands:.2f} (script calls {scripts:.3f}; {breakdown})")
        services = [measured["service"] for measured in rounds if "service" in measured] or [service]
        for n, side in enumerate(services, 1):
            check = side["check"]
            verdict = "OK: 0 lost, 0 duplicated" if check["ok"] else "MISMATCH"
            label = f"count check, round {n}" if len(services) > 1 else "count check"
            lines.append(
                f"{label}: events accepted in 200 answers {check['accepted_in_200s']}, new qbo:events entries "
                f"{check['new_stream_entries']}, distinct event_ids {check['distinct_event_ids']}, "
                f"new dead letters {check['new_dead_letters']} -> {verdict}"
            )
        if any(side["pool_wrapped"] for side in services):
            lines.append("warning: the request pool was reused, so some events were duplicates; raise --pool")
    return "\n".join(lines)
