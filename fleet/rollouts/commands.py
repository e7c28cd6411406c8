"""`outpost fleet rollout ...`: create, watch and steer rollouts over the fleet's HTTP API.

`wait` is for CI: it polls until the rollout is final and exits 0 when it
succeeded, 1 when it was rolled back or aborted, 2 when it paused for a human,
3 when the wait timed out.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from typing import Any

import click

from ..commands import _cell, _emit, _seconds, _table, client_options, fleet_group
from ..devices import parse_selector

EXIT = {"succeeded": 0, "rolled_back": 1, "aborted": 1, "paused": 2}


@fleet_group.group("rollout")
def rollout_group() -> None:
    """Staged rollouts gated on what devices measure, with automatic rollback."""


def _stage(text: str) -> dict[str, Any]:
    t = text.strip()
    try:
        if t.endswith("%"):
            return {"percent": float(t[:-1])}
        return {"devices": int(t)}
    except ValueError:
        raise click.BadParameter(f"{text!r}: a device count (1) or a percentage (5%)") from None


def _metric(text: str) -> tuple[str, dict[str, float]]:
    name, sep, bounds = text.partition("=")
    lo, colon, hi = bounds.partition(":")
    if not sep or not colon:
        raise click.BadParameter(f"{text!r}: expected NAME=MIN:MAX (either side may be empty)")
    out: dict[str, float] = {}
    if lo.strip():
        out["min"] = float(lo)
    if hi.strip():
        out["max"] = float(hi)
    return name, out


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _summary(r: dict[str, Any]) -> None:
    click.echo(f"rollout {r['id']}: {r['bundle']} {r['status']} at stage {r['stage'] + 1}/{len(r['stages'])} "
               f"({r['stage_label']}), {r['devices']} device(s)")
    if r.get("reason"):
        click.echo(f"  {r['reason']}")


@rollout_group.command("create")
@client_options
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--label", "labels", multiple=True, help="Target devices with label k=v (repeatable; all must match).")
@click.option("--device", "devices", multiple=True, help="Target this device (repeatable; instead of labels).")
@click.option("--stage", "stages", multiple=True, help="A stage: device count (1) or percentage (5%%); "
              "repeat in order. Default: 1, 5%%, 25%%, 100%%.")
@click.option("--soak", default="10m", show_default=True, help="Minimum time per stage (s, m, h, d).")
@click.option("--min-requests", default=200, show_default=True, type=click.IntRange(0),
              help="Requests the new version must serve per stage before it is judged.")
@click.option("--p95-ms", type=float, help="p95 bound (default: the bundle's SLO).")
@click.option("--max-p95-regression-pct", type=float, help="p95 at most this %% above the replaced version.")
@click.option("--max-error-rate", type=click.FloatRange(0, 1), help="Default: the bundle's SLO.")
@click.option("--max-nan-rate", type=click.FloatRange(0, 1))
@click.option("--allow-engine", "engines", multiple=True, type=click.Choice(["tensorrt", "cuda", "cpu"]),
              help="Engines the new version may run on (repeatable); a fallback to another fails the gate.")
@click.option("--failure-limit", type=click.IntRange(0), help="Failing evaluations tolerated before rollback.")
@click.option("--install-timeout", help="A device that has not installed after this long counts as failed.")
@click.option("--metric", "metrics", multiple=True, help="Override a declared custom metric's bounds: NAME=MIN:MAX.")
def create(client: Any, as_json: bool, ref: str, labels: tuple[str, ...], devices: tuple[str, ...],
           stages: tuple[str, ...], soak: str, min_requests: int, p95_ms: float | None,
           max_p95_regression_pct: float | None, max_error_rate: float | None, max_nan_rate: float | None,
           engines: tuple[str, ...], failure_limit: int | None, install_timeout: str | None,
           metrics: tuple[str, ...]) -> None:
    """Start rolling NAME@VERSION out, stage by stage."""
    gates: dict[str, Any] = {k: v for k, v in {
        "p95_ms": p95_ms, "max_p95_regression_pct": max_p95_regression_pct, "max_error_rate": max_error_rate,
        "max_nan_rate": max_nan_rate, "failure_limit": failure_limit,
        "install_timeout_s": _seconds(install_timeout) if install_timeout else None}.items() if v is not None}
    if engines:
        gates["allowed_engines"] = list(engines)
    if metrics:
        gates["metrics"] = dict(_metric(m) for m in metrics)
    body: dict[str, Any] = {"bundle": ref, "soak_s": _seconds(soak), "min_requests": min_requests, "gates": gates,
                            "selector": {"devices": list(devices)} if devices else
                            {"labels": parse_selector(list(labels))}}
    if stages:
        body["stages"] = [_stage(s) for s in stages]
    out = client.request("POST", "/api/v1/rollouts", body)
    _emit(out, as_json, lambda: _summary(out))
    if not as_json:
        click.echo(out["id"])


@rollout_group.command("list")
@client_options
@click.option("--status", type=click.Choice(["running", "paused", "succeeded", "rolled_back", "aborted"]))
def list_cmd(client: Any, as_json: bool, status: str | None) -> None:
    """List rollouts, newest first."""
    out = client.request("GET", "/api/v1/rollouts", query={"status": status} if status else None)
    _emit(out, as_json, lambda: _table(
        [{**r, "stage": f"{r['stage'] + 1}/{len(r['stages'])} {r['stage_label']}"} for r in out["rollouts"]],
        ["id", "bundle", "status", "stage", "devices", "created_at"]))


@rollout_group.command("show")
@client_options
@click.argument("rollout_id")
def show(client: Any, as_json: bool, rollout_id: str) -> None:
    """A rollout's stages, gate values against thresholds, and its audit log."""
    out = client.request("GET", f"/api/v1/rollouts/{_q(rollout_id)}")

    def human() -> None:
        _summary(out)
        click.echo("stages:")
        _table(out["stages"], ["index", "label", "devices", "converged", "soak_s", "min_requests", "state"])
        results = (out.get("evaluation") or {}).get("results") or []
        if results:
            click.echo("gates:")
            _table(results, ["gate", "hardware", "value", "threshold", "n", "verdict", "note"])
        click.echo("events:")
        _table([{**e, "why": e["detail"].get("reason", "")} for e in out["events"] if e["kind"] != "hold"],
               ["at", "stage", "kind", "actor", "why"])
    _emit(out, as_json, human)


def _action(name: str, doc: str) -> None:
    @rollout_group.command(name, help=doc)
    @client_options
    @click.argument("rollout_id")
    def cmd(client: Any, as_json: bool, rollout_id: str) -> None:
        out = client.request("POST", f"/api/v1/rollouts/{_q(rollout_id)}/{name}")
        _emit(out, as_json, lambda: _summary(out))


for _name, _doc in (("pause", "Stop taking decisions (devices keep what they run)."),
                    ("resume", "Resume a paused rollout."),
                    ("abort", "Stop and roll every device of the rollout back to its previous version."),
                    ("promote", "Go to the next stage now, skipping the gates of this one.")):
    _action(_name, _doc)


@rollout_group.command("wait")
@client_options
@click.argument("rollout_id")
@click.option("--timeout", "timeout", default="2h", show_default=True, help="Give up after this long (exit 3).")
@click.option("--interval", default="5s", show_default=True, help="How often to look.")
def wait(client: Any, as_json: bool, rollout_id: str, timeout: str, interval: str) -> None:
    """Wait until the rollout is final (and any rollback assigned): exit 0 succeeded, 1 rolled back/aborted,
    2 paused, 3 timed out."""
    deadline = time.monotonic() + _seconds(timeout)
    last = ""
    while True:
        out = client.request("GET", f"/api/v1/rollouts/{_q(rollout_id)}")
        line = f"{out['status']} stage {out['stage'] + 1}/{len(out['stages'])}: {out['reason']}"
        if line != last and not as_json:
            click.echo(f"{_cell(time.time())} {line}", err=True)
            last = line
        if out["status"] in EXIT and (out["settled"] or out["status"] == "paused"):
            if as_json:
                click.echo(json.dumps(out, indent=2, sort_keys=True))
            sys.exit(EXIT[out["status"]])
        if time.monotonic() >= deadline:
            click.echo(f"rollout {rollout_id} still {out['status']} after {timeout}", err=True)
            sys.exit(3)
        time.sleep(_seconds(interval))
