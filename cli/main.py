"""Entry point of the `outpost` command.

Each package owns its commands (`bundle.commands`, `engines.commands`, ...);
this module only lists them, imports each lazily (so `outpost bundle ...` never
pays for aiohttp or SQLAlchemy, and a missing optional extra only breaks its
own sub-command), and translates domain errors into a one-line message and a
non-zero exit code at this single boundary.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

#: sub-command name -> "module:attribute" of its click command or group.
COMMANDS: dict[str, str] = {
    "keys": "bundle.commands:keys_group",
    "bundle": "bundle.commands:bundle_group",
    "fleet": "fleet.commands:fleet_group",
    "serve": "agent.commands:serve_command",
    "engine": "engines.commands:engine_group",
    "doctor": "engines.commands:doctor_command",
    "agent": "agent.daemon.commands:agent_group",
    "up": "cli.up:up_command",
}

#: Exit codes: 1 = refused / failed (verification, validation), 2 = usage (click's own).
EXIT_FAILED = 1


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (repeat for debug).")
@click.version_option(package_name="outpost")
def cli(verbose: int) -> None:
    """Outpost: signed model bundles, compiled engines and batched serving on edge devices.

    \b
    Typical flow:
      outpost keys generate --out keys/
      outpost bundle build model.onnx --name demo --version 1.0.0 --out demo/
      outpost bundle sign demo/ --key keys/signing.key
      outpost bundle verify demo/ --trust keys/signing.pub
    """
    from runtime.journal import configure_logging  # native journal under systemd, secrets redacted

    configure_logging(max(logging.WARNING - 10 * verbose, logging.DEBUG))


def _domain_errors() -> tuple[type[BaseException], ...]:
    """Root error of each package, so that users see messages, not tracebacks."""
    roots: list[type[BaseException]] = []
    for module, name in (("bundle.errors", "BundleError"), ("engines.errors", "EngineError"),
                         ("agent.errors", "AgentError"), ("fleet.errors", "FleetError")):
        mod = sys.modules.get(module)
        if mod is not None:
            roots.append(getattr(mod, name))
    return tuple(roots)


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="outpost", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_FAILED)
    except Exception as e:
        if isinstance(e, _domain_errors()):
            from runtime.journal import REDACTOR  # a message may quote a URL with its password

            click.echo(f"error: {REDACTOR(str(e))}", err=True)
            sys.exit(EXIT_FAILED)
        raise


if __name__ == "__main__":
    main()
