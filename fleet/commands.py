"""`outpost fleet ...`: run the server, bootstrap it, and drive it as an operator.

`serve`, `token create` and `keys init` work on the server's own data
directory and database (no HTTP: they are how a fleet gets its first admin).
Every other command is an HTTP client: the URL and token come from
`--url/--token`, else OUTPOST_FLEET_URL / OUTPOST_FLEET_TOKEN, else the config
file (OUTPOST_FLEET_CONFIG or ~/.config/outpost/fleet.json). Tables for people,
`--json` for scripts; commands that make a secret print it as the last line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pathlib
import re
import tempfile
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click

from runtime import LoopUnavailable, run_loop

from .config import DEFAULT_PORT, ENV_DB, ServerConfig, default_db_url, load_client_config, normalise_db_url

F = TypeVar("F", bound=Callable[..., Any])
_data_option = click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
                            default="fleet-data", show_default=True,
                            help="Fleet data directory (database file, blobs, keys).")


@click.group("fleet")
def fleet_group() -> None:
    """The fleet server: model store, devices, signed assignments, telemetry."""


def _db_url(db: str | None, data: pathlib.Path) -> str:
    url = db or os.environ.get(ENV_DB)
    return normalise_db_url(url) if url else default_db_url(data)


@fleet_group.command("serve")
@click.option("--db", "db_url", help="Database URL (sqlite:///PATH or postgresql://...); default DATA/fleet.db.")
@_data_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--trust", "trust", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path),
              help="Release public key that pushed bundles must be signed by (repeatable).")
@click.option("--max-bundle-bytes", default=2 << 30, show_default=True, type=click.IntRange(1))
@click.option("--enroll-per-minute", default=30, show_default=True, type=click.IntRange(1),
              help="Enrollment attempts allowed per client address and minute.")
@click.option("--loop", "loop_name", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto",
              show_default=True, help="Event loop: auto uses uvloop where installed.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path),
              help="PEM certificate chain: serve HTTPS (with --tls-key).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path),
              help="PEM private key of --tls-cert.")
@click.option("--rollout-interval", "rollout_interval", default="5s", show_default=True,
              help="How often rollout gates are evaluated (keep at or under the devices' report period).")
@click.option("--nudge-mqtt", "nudge_mqtt", default="",
              help="mqtt://host:port of the devices' broker: wake devices when a rollout changes their assignment.")
def serve_cmd(db_url: str | None, data_dir: pathlib.Path, host: str, port: int, trust: tuple[pathlib.Path, ...],
              max_bundle_bytes: int, enroll_per_minute: int, loop_name: str, tls_cert: pathlib.Path | None,
              tls_key: pathlib.Path | None, rollout_interval: str, nudge_mqtt: str) -> None:
    """Run the fleet server until SIGTERM/SIGINT."""
    from .config import RolloutConfig
    from .server import serve
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    config = ServerConfig(data_dir=data_dir, db_url=_db_url(db_url, data_dir), host=host, port=port,
                          trust_keys=trust, max_bundle_bytes=max_bundle_bytes,
                          enroll_attempts_per_minute=enroll_per_minute, tls_cert=tls_cert, tls_key=tls_key,
                          rollouts=RolloutConfig(eval_interval_s=_seconds(rollout_interval),
                                                 nudge_mqtt_url=nudge_mqtt))
    _run(serve(config), loop_name)


def _run(coro: Coroutine[Any, Any, None], loop_name: str) -> None:
    try:
        run_loop(coro, loop_name)
    except LoopUnavailable as e:
        raise click.UsageError(f"--loop {loop_name}: {e}") from None


@fleet_group.group("token")
def token_group() -> None:
    """Operator tokens."""


@token_group.command("create")
@_data_option
@click.option("--db", "db_url", help="Database URL, when not the default file under --data.")
@click.option("--role", type=click.Choice(["admin", "operator", "viewer"]), required=True)
@click.option("--name", default="", help="A note saying whose token this is.")
def token_create(data_dir: pathlib.Path, db_url: str | None, role: str, name: str) -> None:
    """Create an operator token directly in the server's database; prints it last."""
    from .auth import create_operator_token
    from .db import open_database

    async def run() -> tuple[str, str]:
        data_dir.mkdir(parents=True, exist_ok=True)
        db = await open_database(_db_url(db_url, data_dir))
        try:
            return await create_operator_token(db, role, name)
        finally:
            await db.close()

    token_id, secret = asyncio.run(run())
    click.echo(f"created {role} token {token_id} (shown once; store it now)", err=True)
    click.echo(secret)


@fleet_group.group("keys")
def keys_group() -> None:
    """The fleet's assignment-signing key."""


@keys_group.command("init")
@_data_option
def keys_init(data_dir: pathlib.Path) -> None:
    """Create the assignment-signing key (EC P-256, mode 0600) unless it exists."""
    from .signing import PUBLIC_NAME, init_key, load_or_create
    path, created = init_key(data_dir / "keys")
    signer = load_or_create(data_dir / "keys")
    click.echo(f"{'created' if created else 'kept existing'} {path}; key id {signer.key_id}")
    click.echo(str(path.parent / PUBLIC_NAME))


def client_options(f: F) -> F:
    @click.option("--url", help="Fleet URL (else OUTPOST_FLEET_URL, then the config file).")
    @click.option("--token", help="Operator token (else OUTPOST_FLEET_TOKEN, then the config file).")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Client config file (JSON).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    @functools.wraps(f)
    def wrapper(url: str | None, token: str | None, config_path: str | None, as_json: bool,
                *args: Any, **kwargs: Any) -> Any:
        from .client import FleetClient
        client = FleetClient(load_client_config(url, token, config_path))
        return f(client, as_json, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items()) or "-"
    if isinstance(v, list):
        return ",".join(str(x) for x in v) or "-"
    if isinstance(v, float):
        import datetime as _dt
        return _dt.datetime.fromtimestamp(v, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(v)


def _emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human()


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if m is None:
        raise click.BadParameter(f"{text!r}: expected a duration like 3600, 30m, 12h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@token_group.command("revoke")
@client_options
@click.argument("token_id")
def token_revoke(client: Any, as_json: bool, token_id: str) -> None:
    """Revoke an operator token by its id (as printed by `token create`); refused at once everywhere."""
    out = client.request("DELETE", f"/api/v1/tokens/{_q(token_id)}")
    _emit(out, as_json, lambda: click.echo(f"revoked token {out['revoked']}"))


@fleet_group.group("enroll-token")
def enroll_token_group() -> None:
    """Enrollment tokens for new devices."""


@enroll_token_group.command("create")
@client_options
@click.option("--uses", default=1, show_default=True, type=click.IntRange(1, 100000))
@click.option("--ttl", default="24h", show_default=True, help="Lifetime: seconds or 30m, 12h, 7d.")
@click.option("--label", "labels", multiple=True, help="k=v label given to devices enrolled with it.")
def enroll_token_create(client: Any, as_json: bool, uses: int, ttl: str, labels: tuple[str, ...]) -> None:
    """Create an enrollment token; prints it as the last line."""
    from .devices import parse_selector
    out = client.request("POST", "/api/v1/enroll-tokens",
                         {"uses": uses, "ttl_s": _seconds(ttl), "labels": parse_selector(list(labels))})
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    click.echo(f"enrollment token {out['id']}: {out['uses']} use(s), expires {_cell(out['expires_at'])}", err=True)
    click.echo(out["token"])


@fleet_group.command("push")
@client_options
@click.argument("path", type=click.Path(exists=True, path_type=pathlib.Path))
def push(client: Any, as_json: bool, path: pathlib.Path) -> None:
    """Push a signed bundle (a directory, packed on the fly, or a packed file)."""
    if path.is_dir():
        import bundle
        with tempfile.TemporaryDirectory(prefix="outpost-push-") as tmp:
            archive = bundle.pack(path, pathlib.Path(tmp) / "bundle.tar.gz")
            out = client.push(archive)
    else:
        out = client.push(path)
    _emit(out, as_json, lambda: click.echo(
        f"{'pushed' if out['created'] else 'already present (identical)'}: {out['ref']} "
        f"release {out['release']} digest {out['digest'][:16]}"))


@fleet_group.command("bundles")
@client_options
@click.option("--name", help="Only this bundle name.")
def bundles(client: Any, as_json: bool, name: str | None) -> None:
    """List bundle versions."""
    out = client.request("GET", "/api/v1/bundles", query={"name": name} if name else None)
    _emit(out, as_json, lambda: _table(
        [{**b, "digest": b["digest"][:12], "revoked": "REVOKED" if b["revoked"] else ""} for b in out["bundles"]],
        ["ref", "release", "size", "digest", "pushed_at", "revoked"]))


@fleet_group.command("devices")
@client_options
@click.option("--label", "labels", multiple=True, help="Only devices with label k=v (repeatable: all must match).")
def devices(client: Any, as_json: bool, labels: tuple[str, ...]) -> None:
    """List devices."""
    out = client.request("GET", "/api/v1/devices", query={"label": list(labels)} if labels else None)
    _emit(out, as_json, lambda: _table(
        out["devices"], ["id", "name", "labels", "health", "active", "assignment_serial", "last_seen_at"]))


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


@fleet_group.command("device")
@client_options
@click.argument("device_id")
def device(client: Any, as_json: bool, device_id: str) -> None:
    """Show one device, with what it is assigned and its latest report."""
    out = client.request("GET", f"/api/v1/devices/{_q(device_id)}")

    def human() -> None:
        for key in ("id", "name", "labels", "enrolled_at", "last_seen_at", "agent_version", "health",
                    "assignment_serial", "assigned", "assigned_revoked", "active"):
            click.echo(f"{key:18} {_cell(out.get(key))}")
        if out.get("state"):
            click.echo("state:")
            click.echo(json.dumps(out["state"], indent=2, sort_keys=True))
    _emit(out, as_json, human)


@fleet_group.command("assign")
@client_options
@click.argument("device_id")
@click.argument("refs", nargs=-1, required=True, metavar="NAME@VERSION...")
def assign(client: Any, as_json: bool, device_id: str, refs: tuple[str, ...]) -> None:
    """Set exactly which bundles DEVICE should run."""
    out = client.request("PUT", f"/api/v1/devices/{_q(device_id)}/assignment", {"bundles": list(refs)})
    _emit(out, as_json, lambda: click.echo(
        f"{device_id}: {', '.join(out['bundles'])} (serial {out['serial']})"))


@fleet_group.command("revoke")
@client_options
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--reason", default="", help="Why; shown to operators.")
def revoke(client: Any, as_json: bool, ref: str, reason: str) -> None:
    """Revoke a bundle version: never assignable again; devices that have it are told."""
    from .bundles import parse_ref
    name, version = parse_ref(ref)
    out = client.request("POST", f"/api/v1/bundles/{_q(name)}/{_q(version)}/revoke", {"reason": reason})
    _emit(out, as_json, lambda: click.echo(f"revoked {out['ref']}; {out['devices_told']} device(s) told"))


def _register_subcommands() -> None:
    """Command groups that live beside their feature (imported last: they use the helpers above)."""
    from .rollouts import commands as _rollouts  # noqa: F401


_register_subcommands()
