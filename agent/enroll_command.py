"""`outpost agent enroll`: trade an enrollment token for this device's credential.

Registered into the `outpost agent` group (agent.daemon.commands). Writes the
credential (0600, atomically) and, beside it, the fleet's assignment key as
first seen (trust on first use; its key id is printed so an operator can
compare it with `outpost fleet keys` output). Refuses to overwrite an existing
credential without --force: enrolling again makes a new device. The token and
the credential are never printed or logged.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import click

from bundle import atomic_write_bytes

KEY_NAME = "fleet-assignment.pub"


def _labels(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="--label")
        out[k] = v
    return out


@click.command("enroll")
@click.option("--fleet", "fleet_url", required=True, metavar="URL", help="Fleet base URL, e.g. https://fleet:8443.")
@click.option("--token", required=True, envvar="OUTPOST_ENROLL_TOKEN", metavar="T",
              help="Enrollment token (or $OUTPOST_ENROLL_TOKEN, which keeps it out of the process list).")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Device label (repeatable).")
@click.option("--name", default="", help="Device name shown by the fleet (default: its id).")
@click.option("--credential", "credential_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              default=None, help="Where to write the credential [default: $OUTPOST_AGENT_CREDENTIAL, "
                                 "/var/lib/outpost/credential.json as root, else ~/.local/share/outpost/agent].")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA bundle to verify the fleet's TLS certificate.")
@click.option("--force", is_flag=True, help="Replace an existing credential (the old device stays enrolled).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def enroll_command(fleet_url: str, token: str, labels: tuple[str, ...], name: str,
                   credential_path: pathlib.Path | None, ca_file: str | None, force: bool, as_json: bool) -> None:
    """Enroll this device with a fleet and store its credential (mode 0600)."""
    from contract import key_id

    from .credentials import Credential, default_credential_path, save_credential
    from .fleet_client import FleetClient

    path = credential_path or default_credential_path()
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists: this device is enrolled already (use --force to replace it)")
    parsed = _labels(labels)

    async def run() -> tuple[Credential, bytes]:
        async with FleetClient(fleet_url, "", "", ca_file=ca_file) as client:
            cred = await client.enroll(token, parsed, name)
            return cred, await client.fleet_key()

    cred, pem = asyncio.run(run())
    written = save_credential(path, cred)
    key_path = written.parent / KEY_NAME
    atomic_write_bytes(key_path, pem, mode=0o644)
    fleet_key_id = key_id(pem)
    out = {"device_id": cred.device_id, "fleet_url": cred.fleet_url, "credential_path": str(written),
           "fleet_key_path": str(key_path), "fleet_key_id": fleet_key_id, "labels": dict(cred.labels)}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"enrolled as device {cred.device_id}; credential written to {written} (mode 0600)")
        click.echo(f"fleet assignment key {fleet_key_id[:16]}... saved to {key_path}")
