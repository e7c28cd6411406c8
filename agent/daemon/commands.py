"""`outpost agent ...`: run the daemon, show its state, import a bundle from local media, enroll.

`status` reads the state directory only, so it works whether the agent runs
or not, and needs no fleet. `import` is the air-gapped path: the same
verification, anti-rollback floor, engine build and health gate as a fleet
update; it needs the agent stopped (it takes the state directory's lock) and
the next `outpost agent run` serves what it installed. There is no option
anywhere that installs an unsigned or unverified bundle.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from typing import Any

import click

from ..enroll_command import enroll_command

CONFIG_OPTION = click.option("--config", "config_path", required=True,
                             type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
                             help="Agent config (TOML); see agent/daemon/agent.example.toml.")


@click.group("agent")
def agent_group() -> None:
    """The device agent: serve what the fleet assigns, verified, with local rollback."""


agent_group.add_command(enroll_command)


@agent_group.command("run")
@CONFIG_OPTION
@click.option("--loop", "loop_name", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto",
              show_default=True, help="Event loop: auto uses uvloop where installed.")
def run_command(config_path: pathlib.Path, loop_name: str) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    from runtime import stop_on_signals

    from ..commands import console_lifecycle, run_command_loop
    from .agent import run_agent
    from .config import load

    config = load(config_path)

    async def main() -> bool:
        stop = asyncio.Event()
        stop_on_signals(stop)
        return await run_agent(config, stop=stop, lifecycle=console_lifecycle("outpost agent"))

    run_command_loop(main(), loop_name)


def status_doc(config_path: pathlib.Path) -> dict[str, Any]:
    from .config import load
    from .state import StateStore

    config = load(config_path)
    store = StateStore(config.state_dir)
    state = store.load_agent()
    bundles = []
    for rec in store.all():
        bundles.append({
            "name": rec.name,
            "active": rec.active.version if rec.active else None,
            "active_digest": rec.active.digest if rec.active else None,
            "staged": rec.pending.version if rec.pending else None,
            "staged_step": rec.pending.step if rec.pending else None,
            "last_known_good": rec.last_known_good.version if rec.last_known_good else None,
            "floor": rec.floor,
            "failed_starts": store.failed_starts(rec.name, rec.active.digest) if rec.active else 0,
            "last_failure": rec.last_failure, "refused": rec.refused,
        })
    return {"device_id": state.device_id, "running_pid": state.pid, "assignment": {
        "serial": state.serial, "issued_at": state.issued_at, "expires_at": state.expires_at},
        "last_sync": state.last_sync, "last_error": state.last_error, "downloads": state.downloads,
        "models": state.serving, "bundles": bundles, "events": state.events[-10:]}


def _ago(t: float | None) -> str:
    return "never" if not t else f"{time.time() - t:.0f} s ago"


@agent_group.command("status")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def status_command(config_path: pathlib.Path, as_json: bool) -> None:
    """Assignment serial and expiry, active / staged / last-known-good versions, last sync and error, engines."""
    doc = status_doc(config_path)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    a = doc["assignment"]
    expiry = f"expires in {a['expires_at'] - time.time():.0f} s" if a["expires_at"] else "none yet"
    click.echo(f"device     {doc['device_id'] or '(not synced yet)'}   agent "
               f"{'running, pid ' + str(doc['running_pid']) if doc['running_pid'] else 'stopped'}")
    click.echo(f"assignment serial {a['serial']} ({expiry}); last sync {_ago(doc['last_sync'])}")
    if doc["last_error"]:
        click.echo(f"last error {doc['last_error']}")
    for b in doc["bundles"]:
        staged = f"{b['staged']} ({b['staged_step']})" if b["staged"] else "-"
        click.echo(f"bundle {b['name']}: active {b['active'] or '-'}, staged {staged}, "
                   f"last-known-good {b['last_known_good'] or '-'}, floor {b['floor']}")
        if b["last_failure"]:
            f = b["last_failure"]
            click.echo(f"  last failure: {f.get('ref')} at {f.get('step')}: {f.get('reason')}")
    for name, m in sorted(doc["models"].items()):
        fallbacks = f"; fell back from {', '.join(m['fallbacks'])}" if m.get("fallbacks") else ""
        click.echo(f"model {name}@{m['version']}: engine {m['backend']}{fallbacks}")


@agent_group.command("import")
@CONFIG_OPTION
@click.argument("bundle_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
def import_command(config_path: pathlib.Path, bundle_file: pathlib.Path) -> None:
    """Install a signed bundle archive from local media (air-gapped): verified, floor-checked, gated."""
    from .agent import assemble, record_serving, state_lock
    from .config import load

    config = load(config_path)

    async def main() -> str:
        with state_lock(config):
            parts = await asyncio.to_thread(assemble, config)
            try:
                inst = await parts.updater.import_archive(bundle_file.absolute())
                record_serving(parts)
            finally:
                await parts.dataplane.close()
            return f"{pathlib.Path(inst.path).parent.name}@{inst.version} (digest {inst.digest[:12]})"

    ref = asyncio.run(main())
    click.echo(f"imported {ref}; the agent serves it from its next start")
