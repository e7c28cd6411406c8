"""2,000 simulated devices against one fleet process, on SQLite and on PostgreSQL.

    .venv/bin/python bench/fleet_bench.py [--devices 2000] [--duration-s 60] [--backend sqlite postgresql]
                                          [--write-readme]

Each simulated device is real HTTP on loopback: it holds a long-poll on its
assignment (`?serial=N&wait_s=30`, re-issued as soon as it is answered) and
posts a report (heartbeat + one telemetry window) every 10 s, starting at a
random offset. The devices are spread over `--clients` client processes
(aiohttp, one session each), so the load is bounded in count (devices) and in
time (`--duration-s` of measurement after every device has started). While it
runs, the operator side re-assigns `--changes-per-s` devices per second, so
long-polls are also answered by changes, not only by time-outs.

Reported: report latency p50/p99 (client-measured, request to full response),
the delivery delay of assignment changes (PUT answered -> long-poll answered,
which includes the cross-request wake-up), errors of every kind, and the fleet
process's RSS (peak sampled once a second) and CPU time. PostgreSQL comes from
OUTPOST_TEST_POSTGRES_URL or a private throwaway cluster (tests/fleet/pg.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import pathlib
import platform
import random
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORT_EVERY_S = 10.0
#: After the last device has booted: first reports, first polls and cold caches settle
#: (the cold start is reported apart, as "warm-up max").
WARMUP_S = 30.0
LONG_POLL_S = 30.0


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class ClientResult:
    report_latencies_ms: list[float] = field(default_factory=list)
    #: the fleet's own time for the same requests (its Server-Timing header)
    report_server_ms: list[float] = field(default_factory=list)
    poll_answers: int = 0
    #: device -> [(serial, time first seen)], in order: a change is delivered once a serial at least as new is seen
    serials_seen: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    #: requests the fleet answered 503 + Retry-After (load shedding), by phase; retried after that delay
    deferred: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    slow: list[tuple[float, float]] = field(default_factory=list)  # (time, ms) of reports over 100 ms
    warmup_max_ms: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def defer(self, kind: str) -> None:
        self.deferred[kind] = self.deferred.get(kind, 0) + 1


def _retry_after(r: Any) -> float | None:
    """The delay a 503 asked for, as the agent honours it; None for any other answer."""
    if r.status != 503:
        return None
    try:
        return max(0.0, float(r.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _report_body(now: float) -> dict[str, Any]:
    return {
        "agent_version": "0.1.0",
        "hardware": {"cpu": "x86_64", "memory_bytes": 8e9, "gpu_name": "none"},
        "bundles": [{"ref": "demo@1.0.0", "active": True, "engine": "cpu", "fallback_reasons": []}],
        "health": {"status": "ok"},
        "telemetry": [{"start": now - REPORT_EVERY_S, "end": now, "requests": 100, "errors": 0,
                       "cpu_percent": 20.0, "memory_bytes": 2e8, "temperature_c": 55.0,
                       "models": {"mlp": {"requests": 100, "errors": 0, "p50_ms": 0.5, "p95_ms": 0.9,
                                          "p99_ms": 1.2}}}],
    }


async def _device(http: Any, url: str, device_id: str, cred: str, start_at: float, stop_at: float,
                  measure_from: float, result: ClientResult) -> None:
    import aiohttp
    headers = {"Authorization": f"Bearer {cred}"}

    async def poll_loop() -> None:
        serial = 0
        while time.time() < stop_at:
            try:
                async with http.get(f"{url}/api/v1/devices/{device_id}/assignment",
                                    params={"serial": str(serial), "wait_s": str(LONG_POLL_S)},
                                    headers=headers, timeout=aiohttp.ClientTimeout(total=LONG_POLL_S + 30)) as r:
                    delay = _retry_after(r)
                    if delay is not None:
                        result.defer("poll")
                        await asyncio.sleep(delay)
                        continue
                    if r.status != 200:
                        result.error(f"poll HTTP {r.status}")
                        await asyncio.sleep(1)
                        continue
                    body = await r.json()
                new = int(body["document"]["serial"])
                if new != serial:
                    result.serials_seen.setdefault(device_id, []).append((new, time.time()))
                serial = new
                result.poll_answers += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                result.error(f"poll {type(e).__name__}")
                await asyncio.sleep(1)

    await asyncio.sleep(max(0.0, start_at - time.time()))  # the device boots
    poller = asyncio.create_task(poll_loop())
    try:
        next_at = start_at
        while next_at < stop_at:
            t0 = time.perf_counter()
            measured = time.time() >= measure_from  # only requests sent inside the window count
            try:
                async with http.post(f"{url}/api/v1/devices/{device_id}/reports", json=_report_body(time.time()),
                                     headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    await r.read()
                    delay = _retry_after(r)
                    if delay is not None:  # shed: the agent keeps the report and sends it after the delay
                        result.defer("report (measured)" if measured else "report (warm-up)")
                        await asyncio.sleep(delay)
                        continue
                    if r.status != 202:
                        result.error(f"report HTTP {r.status}")
                    elif not measured:
                        result.warmup_max_ms = max(result.warmup_max_ms, (time.perf_counter() - t0) * 1000)
                    else:
                        ms = (time.perf_counter() - t0) * 1000
                        result.report_latencies_ms.append(ms)
                        timing = r.headers.get("Server-Timing", "")
                        if "dur=" in timing:
                            result.report_server_ms.append(float(timing.split("dur=")[1]))
                        if ms > 100:
                            result.slow.append((time.time(), ms))
            except Exception as e:
                result.error(f"report {type(e).__name__}")
            next_at += REPORT_EVERY_S
            await asyncio.sleep(max(0.0, next_at - time.time()))
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


async def _client_main(url: str, devices: list[tuple[str, str]], ramp_s: float, duration_s: float,
                       t0: float) -> ClientResult:
    import aiohttp
    result = ClientResult()
    measure_from = t0 + ramp_s + WARMUP_S
    stop_at = measure_from + duration_s
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [asyncio.create_task(_device(http, url, d, c, t0 + ramp_s * i / len(devices)
                                             + random.uniform(0, REPORT_EVERY_S), stop_at, measure_from, result))
                 for i, (d, c) in enumerate(devices)]
        await asyncio.gather(*tasks)
    return result


def client_process(args: tuple[str, list[tuple[str, str]], float, float, float]) -> dict[str, Any]:
    import gc
    _raise_fd_limit()
    gc.freeze()
    return asdict(asyncio.run(_client_main(*args)))


@contextlib.contextmanager
def _database(backend: str, data: pathlib.Path) -> Iterator[str | None]:
    if backend == "sqlite":
        yield None
        return
    from tests.fleet.pg import postgres_database
    with postgres_database() as url:
        yield url


def _start_server(data: pathlib.Path, db: str | None, trust: pathlib.Path) -> tuple[Any, str]:
    import subprocess
    profile = os.environ.get("FLEET_BENCH_PROFILE")  # write a cProfile of the fleet process there
    args = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []), "-m", "cli.main",
            "-v", "fleet", "serve", "--data", str(data), "--port", "0", "--trust", str(trust),
            "--enroll-per-minute", "100000"]
    if db:
        args += ["--db", db]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_raise_fd_limit)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("fleet: listening on "):
            import threading
            def drain(log: pathlib.Path = data.parent / "fleet.log") -> None:
                with open(log, "w", buffering=1) as f:  # line by line: read while it runs
                    for rest in proc.stdout or ():
                        f.write(rest)
            threading.Thread(target=drain, daemon=True).start()
            return proc, line.split()[-1]
    raise RuntimeError("fleet did not start")


_STALL = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) WARNING fleet\.stalls: event loop stalled "
                    r"(\d+) ms \(garbage collector: (\d+) ms", re.M)


def _loop_stalls(log_text: str, t0: float) -> list[tuple[float, float, float]]:
    """(seconds after t0, stall ms, of which gc ms) from the fleet's own stall warnings (fleet/stalls.py)."""
    out = []
    for m in _STALL.finditer(log_text):
        at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        out.append((at - t0, float(m.group(3)), float(m.group(4))))
    return out


async def _sample_pg_waits(url: str, done: Any, tally: dict[str, int]) -> None:
    """What the fleet's PostgreSQL sessions are doing, 10 times a second: where a slow commit waits.

    Also counts checkpoints the server ran meanwhile (other users of a shared server cause them)."""
    import asyncpg
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        q = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        checkpoints = await conn.fetchval(q)
        while not done():
            for row in await conn.fetch(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'"):
                key = f"{row['state']}:{row['wait_event_type'] or 'cpu'}:{row['wait_event'] or '-'}"
                tally[key] = tally.get(key, 0) + 1
            await asyncio.sleep(0.1)
        tally["checkpoints during the run"] = await conn.fetchval(q) - checkpoints
    finally:
        await conn.close()


def _gc_summary(log_text: str) -> str:
    """The fleet's own count of garbage collections while serving (fleet/stalls.py, logged at exit)."""
    m = re.search(r"garbage collections while serving: (.*)$", log_text, re.M)
    return m.group(1) if m else "not logged"


def _start_py_spy(pid: int, backend: str) -> Any:
    """Sample the fleet with py-spy (FLEET_BENCH_PY_SPY=path of the binary) into FLEET_BENCH_PROFILE_DIR,
    as a speedscope file: its samples keep their order, so a stall can be found in time."""
    import subprocess
    binary = os.environ.get("FLEET_BENCH_PY_SPY")
    if not binary:
        return None
    out = pathlib.Path(os.environ.get("FLEET_BENCH_PROFILE_DIR", ".")) / f"fleet-{backend}.speedscope.json"
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--rate", "200", "--format", "speedscope", "--idle",
                             "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_py_spy(spy: Any) -> None:
    import signal
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


async def _setup(url: str, admin: str, bundles: list[pathlib.Path], n: int) -> list[tuple[str, str]]:
    import aiohttp
    h = {"Authorization": f"Bearer {admin}"}
    async with aiohttp.ClientSession() as http:
        for b in bundles:
            async with http.post(f"{url}/api/v1/bundles", data=b.read_bytes(), headers=h) as r:
                assert r.status in (200, 201), await r.text()
        async with http.post(f"{url}/api/v1/enroll-tokens", json={"uses": n}, headers=h) as r:
            token = (await r.json())["token"]
        sem = asyncio.Semaphore(32)

        async def enroll(i: int) -> tuple[str, str]:
            async with sem, http.post(f"{url}/api/v1/enroll", json={"name": f"sim-{i}", "labels": {"bench": "1"}},
                                      headers={"Authorization": f"Bearer {token}"}) as r:
                body = await r.json()
            async with sem, http.put(f"{url}/api/v1/devices/{body['device_id']}/assignment",
                                     json={"bundles": ["demo@1.0.0"]}, headers=h) as r:
                assert r.status == 200
            return body["device_id"], body["credential"]

        return list(await asyncio.gather(*(enroll(i) for i in range(n))))


async def _operator(url: str, admin: str, devices: list[str], per_s: float, start_at: float, stop_at: float,
                    changes: dict[str, float], errors: dict[str, int]) -> None:
    """Flip some devices between two versions, remembering when each change was acknowledged."""
    import aiohttp
    h = {"Authorization": f"Bearer {admin}"}
    state = dict.fromkeys(devices, "demo@1.0.0")
    await asyncio.sleep(max(0.0, start_at - time.time()))
    async with aiohttp.ClientSession() as http:
        while time.time() < stop_at - LONG_POLL_S / 2:
            for d in random.sample(devices, max(1, int(per_s))):
                state[d] = "demo@1.0.1" if state[d] == "demo@1.0.0" else "demo@1.0.0"
                try:
                    async with http.put(f"{url}/api/v1/devices/{d}/assignment", json={"bundles": [state[d]]},
                                        headers=h) as r:
                        body = await r.json()
                        if r.status == 200:
                            changes[f"{d}:{body['serial']}"] = time.time()
                        else:
                            errors[f"assign HTTP {r.status}"] = errors.get(f"assign HTTP {r.status}", 0) + 1
                except Exception as e:
                    errors[f"assign {type(e).__name__}"] = errors.get(f"assign {type(e).__name__}", 0) + 1
            await asyncio.sleep(1.0)


def run_backend(backend: str, n: int, duration_s: float, clients: int, changes_per_s: float) -> dict[str, Any]:
    import psutil

    import bundle
    from tests.models.make_models import write_all
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp_s:
        tmp = pathlib.Path(tmp_s)
        write_all(tmp / "models")
        key, pub = bundle.generate_keys(tmp / "keys")
        archives = []
        for version in ("1.0.0", "1.0.1"):
            d = tmp / f"demo-{version}"
            bundle.build([tmp / "models" / "mlp.onnx"], d, bundle.BuildOptions(name="demo", version=version))
            bundle.sign_directory(d, key)
            archives.append(bundle.pack(d, tmp / f"demo-{version}.tar.gz"))
        with _database(backend, tmp) as db:
            import subprocess
            data = tmp / "data"
            token_args = [sys.executable, "-m", "cli.main", "fleet", "token", "create", "--data", str(data),
                          "--role", "admin"] + (["--db", db] if db else [])
            admin = subprocess.run(token_args, cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.splitlines()[-1]
            proc, url = _start_server(data, db, pub)
            spy = _start_py_spy(proc.pid, backend)
            try:
                fleet = psutil.Process(proc.pid)
                t_setup = time.time()
                devices = asyncio.run(_setup(url, admin, archives, n))
                setup_s = time.time() - t_setup
                rss_idle = fleet.memory_info().rss
                cpu0 = sum(fleet.cpu_times()[:2])
                ramp_s = REPORT_EVERY_S
                t0 = time.time() + 2
                per = [devices[i::clients] for i in range(clients)]
                ctx = mp.get_context("spawn")
                peak_rss = rss_idle
                changes: dict[str, float] = {}
                op_errors: dict[str, int] = {}
                pg_waits: dict[str, int] = {}
                measure_from = t0 + ramp_s + WARMUP_S
                with ctx.Pool(clients) as pool:
                    pending = pool.map_async(client_process, [(url, p, ramp_s, duration_s, t0) for p in per])

                    async def watch() -> None:
                        operator = _operator(url, admin, [d for d, _ in devices], changes_per_s,
                                             measure_from, measure_from + duration_s, changes, op_errors)

                        async def sample_rss() -> None:
                            nonlocal peak_rss
                            while not pending.ready():
                                peak_rss = max(peak_rss, fleet.memory_info().rss)
                                await asyncio.sleep(1.0)

                        samplers = [operator, sample_rss()]
                        if db:
                            samplers.append(_sample_pg_waits(db, pending.ready, pg_waits))
                        await asyncio.gather(*samplers)

                    asyncio.run(watch())
                    results = pending.get()
                cpu_s = sum(fleet.cpu_times()[:2]) - cpu0
                wall_s = time.time() - t0
            finally:
                _stop_py_spy(spy)
                proc.terminate()
                proc.wait(timeout=30)
                time.sleep(0.5)
                log_text = (tmp / "fleet.log").read_text() if (tmp / "fleet.log").exists() else ""
                if log_text.strip():
                    print("fleet log (tail):\n" + log_text[-3000:], file=sys.stderr)
                if proc.stdout is not None:
                    proc.stdout.close()
    lat = [x for r in results for x in r["report_latencies_ms"]]
    server = [x for r in results for x in r["report_server_ms"]]
    errors: dict[str, int] = dict(op_errors)
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    seen: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        for d, sightings in r["serials_seen"].items():
            seen.setdefault(d, []).extend(sightings)
    delivered_at: dict[str, float] = {}
    for k in changes:
        device, want = k.rsplit(":", 1)
        at = [when for s_, when in seen.get(device, []) if s_ >= int(want)]
        if at:
            delivered_at[k] = min(at)
    delays = [(delivered_at[k] - t) * 1000 for k, t in changes.items() if k in delivered_at]
    deferred: dict[str, int] = {}
    for r in results:
        for k, v in r["deferred"].items():
            deferred[k] = deferred.get(k, 0) + v
    slow = sorted(x for r in results for x in r["slow"])
    if slow:
        per_s: dict[int, list[float]] = {}
        for t, ms in slow:
            per_s.setdefault(int(t - t0), []).append(ms)
        print("reports over 100 ms, by second after start (count, max ms):",
              " ".join(f"{k}s:{len(v)},{max(v):.0f}" for k, v in sorted(per_s.items())), file=sys.stderr)
    stalls = _loop_stalls(log_text, t0)
    if stalls:
        print("fleet event-loop stalls over 100 ms (s after start: ms, gc ms):",
              " ".join(f"{t:.0f}:{ms:.0f},{g:.0f}" for t, ms, g in stalls), file=sys.stderr)
    measured_stalls = [ms for t, ms, _ in stalls if t >= measure_from - t0]
    late = sorted((t - t0, (delivered_at[k] - t) * 1000) for k, t in changes.items() if k in delivered_at)
    print("change delivery (s after start, ms):", " ".join(f"{a:.0f}:{b:.0f}" for a, b in late), file=sys.stderr)
    return {
        "backend": backend, "devices": n, "duration_s": duration_s, "setup_s": round(setup_s, 1),
        "reports": len(lat), "reports_per_s": round(len(lat) / duration_s, 1),
        "report_p50_ms": round(_pct(lat, 0.50), 2), "report_p99_ms": round(_pct(lat, 0.99), 2),
        "report_max_ms": round(max(lat), 1) if lat else None,
        "report_server_p50_ms": round(_pct(server, 0.50), 2),
        "report_server_p99_ms": round(_pct(server, 0.99), 2),
        "warmup_report_max_ms": round(max(r["warmup_max_ms"] for r in results), 1),
        "poll_answers": sum(r["poll_answers"] for r in results),
        "changes": len(changes), "changes_delivered": len(delays),
        "change_delivery_p50_ms": round(statistics.median(delays), 1) if delays else None,
        "change_delivery_p99_ms": round(_pct(delays, 0.99), 1) if delays else None,
        "errors": errors, "error_count": sum(errors.values()),
        "deferred": deferred, "gc": _gc_summary(log_text), "pg_waits": pg_waits,
        "loop_stalls": len(measured_stalls), "loop_stall_max_ms": round(max(measured_stalls, default=0.0)),
        "fleet_rss_idle_mib": round(rss_idle / 2**20), "fleet_rss_peak_mib": round(peak_rss / 2**20),
        "fleet_cpu_percent_of_one_core": round(100 * cpu_s / wall_s),
    }


#: Observations across runs, kept with the generated section (edit by hand after a re-run).
NOTE = ("Measured by the i9-fleet change on this shared 2-core VM with six other developers' test suites running "
        "beside it (the load average after each run is in the table; it moved between 1 and 7 during the "
        "work): absolute figures from such runs scatter by 2-5x, and every miss measured came with a load "
        "average over 4, so the verdict belongs to a re-run on a quiet machine. The set of three runs before "
        "the one above, same code (load 1.5-4.8), gave SQLite p99 260.8, 36.1, 22.0 ms and PostgreSQL 387.9, "
        "22.5, 22.7 ms, zero errors and every change delivered, warm-up max 0.25-2.0 s; its two misses were "
        "the runs at load 4.7-4.8. A set before that (without the loop-lag shedding, load 5-7) gave SQLite "
        "p99 120.5, 122.0, 145.8 ms and PostgreSQL "
        "315.9, 1847.5, 1377.1 ms, zero errors and every change delivered in all six, no loop stall on SQLite "
        "and 5-17 on PostgreSQL, where the stall watch attributed them to the process not getting a CPU "
        "(young collections of a few ms taking 100-190 ms).")


def _ok(r: dict[str, Any]) -> bool:
    return bool(r["report_p99_ms"] < 100 and r["error_count"] == 0 and r["changes_delivered"] == r["changes"])


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Target: report p99 < 100 ms, zero errors, every assignment change delivered, in every run."""
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        met = sum(_ok(r) for r in mine)
        out.append(f"- {backend}: target (p99 < 100 ms, 0 errors, every change delivered) met in {met} of "
                   f"{len(mine)} consecutive runs (p99 " + ", ".join(f"{r['report_p99_ms']}" for r in mine)
                   + " ms; errors " + ", ".join(str(r["error_count"]) for r in mine) + "; delivered "
                   + ", ".join(f"{r['changes_delivered']}/{r['changes']}" for r in mine) + ").")
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | backend | devices | reports/s | report p50 | report p99 | in the fleet p50 / p99 | errors "
            "| change delivery p50 / p99 | warm-up report max | shed (503, retried) | loop stalls > 100 ms "
            "| fleet RSS (idle -> peak) | fleet CPU | load avg after |")
    out = [head, "|" + "---|" * 15]
    for r in rows:
        out.append(f"| {r.get('run', 1)} | {r['backend']} | {r['devices']} | {r['reports_per_s']} "
                   f"| {r['report_p50_ms']} ms "
                   f"| {r['report_p99_ms']} ms | {r['report_server_p50_ms']} / {r['report_server_p99_ms']} ms "
                   f"| {r['error_count']} | {r['change_delivery_p50_ms']} / "
                   f"{r['change_delivery_p99_ms']} ms ({r['changes_delivered']}/{r['changes']}) "
                   f"| {r['warmup_report_max_ms']} ms "
                   f"| {sum(r['deferred'].values())} | {r['loop_stalls']} (max {r['loop_stall_max_ms']} ms) "
                   f"| {r['fleet_rss_idle_mib']} -> {r['fleet_rss_peak_mib']} MiB "
                   f"| {r['fleet_cpu_percent_of_one_core']}% of a core | {r.get('load_average_after', '-')} |")
    return "\n".join(out)


def write_readme(rows: list[dict[str, Any]], argv: list[str], load: str) -> None:
    path = ROOT / "bench" / "README.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = "\n".join([
        "## Fleet",
        "",
        f"`.venv/bin/python bench/fleet_bench.py {' '.join(argv)}`, {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; fleet, client processes and PostgreSQL on the same "
        f"machine ({load}).",
        "",
        "To re-run the target on a quiet machine: `.venv/bin/python bench/fleet_bench.py --devices 2000 "
        "--duration-s 60 --runs 3 --write-readme` (about 20 minutes; PostgreSQL from OUTPOST_TEST_POSTGRES_URL "
        "or a private throwaway cluster). It prints one JSON line per run and backend, then the table below and "
        "one verdict line per backend; on standard error, per run: the reports over 100 ms by second, the "
        "fleet's own event-loop stall warnings (`fleet/stalls.py`: each stall over 100 ms with the garbage "
        "collector's share of it), and every change's delivery delay. With `FLEET_BENCH_PY_SPY=path/to/py-spy "
        "FLEET_BENCH_PROFILE_DIR=DIR` the fleet is sampled by py-spy into a speedscope file per backend (samples "
        "in time order, idle included, so a stall can be found in time).",
        "",
        "One `outpost fleet serve` process. Each simulated device (real aiohttp clients on loopback, spread over "
        "client processes) boots at a random time in the first 20 s, then holds a long-poll on its signed "
        "assignment (`wait_s=30`) and posts a report (heartbeat + one telemetry window) every 10 s; an "
        "operator re-assigns 5 devices every second. Latencies are client-measured for requests sent in "
        f"the measurement window, which opens {WARMUP_S:.0f} s after the last device booted; 'warm-up report "
        "max' is the slowest report before that (the cold start). 'In the fleet' is the server's own time for "
        "the same reports (its `Server-Timing` header). 'Change delivery' is from the operator's PUT being "
        "answered to the device's long-poll returning a serial at least that new. 'Shed' counts requests the "
        "fleet answered 503 with a jittered Retry-After (a cold-start herd, `fleet/admission.py`); the "
        "simulated device, like the agent, waits that long and sends the same request again, so a shed "
        "request is neither an error nor lost. 'Loop stalls' are the fleet's own stall warnings inside the "
        "measurement window. Errors count the whole run, warm-up included.",
        "",
        table(rows),
        "",
        *verdicts(rows),
        "",
        "Errors by kind: " + "; ".join(f"{r['backend']} run {r.get('run', 1)}: {r['errors'] or 'none'}"
                                       for r in rows) + ".",
        "Garbage collections in the fleet while serving (from its log): "
        + "; ".join(f"{r['backend']} run {r.get('run', 1)}: {r['gc']}" for r in rows) + ".",
        "",
        "Root causes found (profiles: py-spy on the fleet during the run, the fleet's own stall and batch "
        "warnings, pg_stat_activity sampled by the bench):",
        "",
        "- Periodic stalls were CPython's full garbage collections. The stall watch attributed every stall "
        "over 100 ms in the first runs to the collector: generation-2 collections of 150-950 ms every 2-5 s "
        "(e.g. 275, 327, 677, 171 and 280 ms within 25 s on SQLite). A fleet with 2,000 devices keeps "
        "~120 tracked objects per device alive (held long-polls, kept-alive report connections; census with "
        "500 devices: ~250 per device including the client side), they all reach the old generation, and "
        "CPython collects it whenever it grew by a quarter, walking every object with the GIL held. Almost "
        "none of it is garbage (10 cyclic objects in 6 s of 500 devices' traffic). Fix (`fleet/gcpolicy.py`): "
        "start-up objects frozen, automatic full collections off, one full collection every 10 minutes run by "
        "the fleet itself. Raising the young threshold instead was tried and made middle-generation "
        "collections walk ~100k objects (150-250 ms), so the young thresholds stay at CPython's. After: no "
        "full collection while serving, no stall attributed to the collector over 100 ms in the measurement "
        "windows measured.",
        "- Each held long-poll used `asyncio.wait_for`, a task, a cancellation and an exception per poll: now "
        "one timer that sets the same event a change sets (`Assignments.wait`), fewer live objects per poll.",
        "- The cold start queued: 2,000 devices booting in 20 s each need a credential lookup, a serial read, "
        "a document build and a first report; queued behind each other the slowest first report took 5-15 s "
        "here (18.5 s on the quiet machine) and some timed out. Now the fleet sheds first-contact work "
        "(`fleet/admission.py`) while 40 units of database work are open, or while a herd of first contacts "
        "arrives (20 a second or more) and its event loop runs over 100 ms behind, and reports while 1,000 "
        "are queued, with 503 and a Retry-After drawn from 1-10 s: devices come back spread over a report "
        "period, and requests that need no database (cached credential, known serial) are never shed. On "
        "SQLite the warm-up max fell to 0.7-1.1 s; on PostgreSQL the pool bound never tripped (11-14 s "
        "warm-up: the queue was the CPU-starved event loop, not the pool), hence the loop-lag condition.",
        "- PostgreSQL: `pool_pre_ping` cost a round trip and ~9% of the fleet's busy CPU (py-spy: "
        "`_async_ping`) on every unit of work; removed (a dead connection fails once and SQLAlchemy then "
        "invalidates the pool). Sampled pg_stat_activity shows the fleet's sessions almost always 'idle in "
        "transaction, ClientRead' (waiting for the fleet's next statement), rarely on WALSync, and 1-3 "
        "checkpoints per run requested by other users of the shared server: what remains of the PostgreSQL "
        "tail here is the fleet process waiting for a CPU, which this machine's load explains.",
        "- Undelivered changes: a change now counts as delivered when the device sees a serial at least as new "
        "(a device re-assigned twice in a few seconds legitimately skips the middle serial, which the old "
        "exact-serial count called lost); with stalls gone every change was delivered in every run below.",
        "- Not fixed, seen on SQLite: with the loop free (no stall warning), some report batches still took "
        "100-400 ms in the writer's thread, a few times a minute (the fleet's 'report batch ... took' "
        "warnings), which is what is left of the SQLite tail here. The likely cause is SQLite's automatic WAL "
        "checkpoint, which runs inside the commit that crosses 1,000 pages and syncs the file while the "
        "machine's disk is shared with six test suites; not verified, so not changed. The candidate fix: "
        "PASSIVE checkpoints from a separate connection every second, the writer's automatic one kept as a "
        "backstop at a higher threshold.",
        "- Evidence tools kept: the fleet logs each event-loop stall over 100 ms with the collector's share, "
        "each report batch over 100 ms with its queue, and its collections at exit; the bench prints them.",
        "",
        NOTE,
        "",
    ])
    pattern = re.compile(r"^## Fleet\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text, count=1) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--changes-per-s", type=float, default=5.0)
    ap.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    ap.add_argument("--runs", type=int, default=1, help="consecutive runs of each backend (the target: 3)")
    ap.add_argument("--write-readme", action="store_true", help="replace the Fleet section of bench/README.md")
    args = ap.parse_args()
    _raise_fd_limit()
    load = f"load average {os.getloadavg()[0]:.1f} at start"
    rows = []
    for run in range(1, args.runs + 1):
        for backend in args.backend:
            row = run_backend(backend, args.devices, args.duration_s, args.clients, args.changes_per_s)
            row["run"] = run
            row["load_average_after"] = round(os.getloadavg()[0], 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))
    for line in verdicts(rows):
        print(line)
    if args.write_readme:
        write_readme(rows, sys.argv[1:], load)


if __name__ == "__main__":
    main()
