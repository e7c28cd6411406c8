"""`outpost keys ...` and `outpost bundle ...`: the bundle format's command line.

Commands raise `BundleError`s; `cli.main` turns them into one-line messages
and a non-zero exit code, so nothing here prints tracebacks or exits itself.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, get_args

import click

from . import archive, keys, oms
from . import builder as build_mod
from . import manifest as mf
from . import verifier as verify_mod
from .manifest import EngineKind

PathArg = click.Path(path_type=pathlib.Path)
ExistingFile = click.Path(exists=True, dir_okay=False, path_type=pathlib.Path)
ExistingDir = click.Path(exists=True, file_okay=False, path_type=pathlib.Path)


@click.group("keys")
def keys_group() -> None:
    """Signing keys for bundles (EC P-256, PEM)."""


@keys_group.command("generate")
@click.option(
    "--out", "out_dir", type=PathArg, required=True, help="Directory to write signing.key and signing.pub into."
)
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keys_generate(out_dir: pathlib.Path, force: bool) -> None:
    """Create a key pair: DIR/signing.key (mode 0600) and DIR/signing.pub.

    Keep signing.key offline (CI secret, HSM export); ship signing.pub to the
    fleet and devices as a trusted key.
    """
    key, pub = keys.generate(out_dir, overwrite=force)
    click.echo(f"private key: {key} (mode 0600)")
    click.echo(f"public key:  {pub} (fingerprint {keys.fingerprint(pub.read_bytes())})")


@click.group("bundle")
def bundle_group() -> None:
    """Build, sign, verify, inspect and pack model bundles."""


def _engines(value: str) -> tuple[EngineKind, ...]:
    allowed = get_args(EngineKind)
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f"expected a comma-separated list of {', '.join(allowed)}; got {value!r}")
    return items  # type: ignore[return-value]


@bundle_group.command("build")
@click.argument("models", nargs=-1, required=True, type=ExistingFile)
@click.option("--name", required=True, help="Bundle name (lowercase letters, digits, . _ -).")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.4.0.")
@click.option(
    "--release",
    type=click.IntRange(0, 2**31 - 1),
    default=1,
    show_default=True,
    help="Release counter; must increase with each release of this name (anti-rollback).",
)
@click.option("--owner", default="", help="Owning team or person, for the fleet catalog.")
@click.option("--description", default="", help="What the model does, for the fleet catalog.")
@click.option("--slo-p95-ms", type=float, default=None, help="Latency SLO: p95 in milliseconds.")
@click.option("--slo-max-error-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--batch-max", type=click.IntRange(1, 4096), default=32, show_default=True, help="Max batch size.")
@click.option(
    "--batch-delay-ms",
    type=click.FloatRange(0, 10000),
    default=2.0,
    show_default=True,
    help="Max time a request waits for a batch to fill.",
)
@click.option(
    "--engines",
    "engines",
    default="tensorrt,cuda,cpu",
    show_default=True,
    help="Engine preference order (comma-separated).",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--min-compute-capability", default=None, help="Lowest CUDA compute capability, e.g. 7.5.")
@click.option(
    "--arch",
    "archs",
    multiple=True,
    type=click.Choice(["x86_64", "aarch64"]),
    help="Allowed CPU architecture (repeat; default both).",
)
@click.option("--samples", type=ExistingFile, default=None, help="Sample inputs (.npz keyed by input name).")
@click.option("--asset", "assets", multiple=True, type=ExistingFile, help="Extra file to ship (repeat).")
@click.option("--out", "out_dir", type=PathArg, required=True, help="Bundle directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def bundle_build(
    models: tuple[pathlib.Path, ...],
    name: str,
    version: str,
    release: int,
    owner: str,
    description: str,
    slo_p95_ms: float | None,
    slo_max_error_rate: float,
    batch_max: int,
    batch_delay_ms: float,
    engines: str,
    precision: str,
    min_compute_capability: str | None,
    archs: tuple[str, ...],
    samples: pathlib.Path | None,
    assets: tuple[pathlib.Path, ...],
    out_dir: pathlib.Path,
    force: bool,
) -> None:
    """Build an unsigned bundle from ONNX MODELS.

    The input/output signature (names, dtypes, shapes with dynamic dims) is
    read from each graph, and every model must pass the ONNX checker. Sign the
    result with `outpost bundle sign`.
    """
    opts = build_mod.BuildOptions(
        name=name,
        version=version,
        release=release,
        owner=owner,
        description=description,
        slo_p95_ms=slo_p95_ms,
        slo_max_error_rate=slo_max_error_rate,
        max_batch_size=batch_max,
        max_queue_delay_ms=batch_delay_ms,
        engines=_engines(engines),
        precision="fp16" if precision == "fp16" else "fp32",
        min_compute_capability=min_compute_capability,
        architectures=archs or ("x86_64", "aarch64"),
        samples=samples,
        assets=assets,
    )
    manifest = build_mod.build(models, out_dir, opts, overwrite=force)
    click.echo(
        f"built {manifest.ref} (release {manifest.release}) at {out_dir}: "
        f"{len(manifest.models)} model(s); unsigned, run `outpost bundle sign`"
    )
    for warning in build_mod.sample_warnings(manifest):
        click.secho(f"warning: {warning}", fg="yellow", err=True)


@bundle_group.command("sign")
@click.argument("bundle_dir", type=ExistingDir)
@click.option("--key", type=ExistingFile, required=True, help="EC private key (PEM).")
@click.option(
    "--cert",
    "signing_cert",
    type=ExistingFile,
    default=None,
    help="Signing certificate (PEM) for certificate-based signing.",
)
@click.option(
    "--chain",
    "chain",
    multiple=True,
    type=ExistingFile,
    help="Intermediate/root certificates for certificate-based signing (repeat).",
)
def bundle_sign(
    bundle_dir: pathlib.Path, key: pathlib.Path, signing_cert: pathlib.Path | None, chain: tuple[pathlib.Path, ...]
) -> None:
    """Sign BUNDLE_DIR into BUNDLE_DIR/model.sig (OpenSSF Model Signing format)."""
    manifest = mf.load(bundle_dir)  # refuse to sign something that is not a valid bundle
    sig = oms.sign_directory(bundle_dir, key, signing_certificate=signing_cert, certificate_chain=chain)
    click.echo(f"signed {manifest.ref}: {sig}")


def _verified_json(vb: verify_mod.VerifiedBundle) -> dict[str, Any]:
    return {
        "ok": True,
        "bundle": vb.manifest.ref,
        "release": vb.manifest.release,
        "digest": vb.digest,
        "signer": vb.signer,
        "files": {k: {"size": f.size, "sha256": f.sha256} for k, f in vb.files.items()},
    }


@bundle_group.command("verify")
@click.argument("bundle_dir", type=PathArg)
@click.option(
    "--trust",
    "trust",
    multiple=True,
    type=ExistingFile,
    help="Trusted public key (PEM); repeat to trust several (key rotation).",
)
@click.option(
    "--trust-chain",
    "trust_chain",
    multiple=True,
    type=ExistingFile,
    help="CA certificate(s) trusted for certificate-based signatures (repeat).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bundle_verify(
    bundle_dir: pathlib.Path, trust: tuple[pathlib.Path, ...], trust_chain: tuple[pathlib.Path, ...], as_json: bool
) -> None:
    """Verify BUNDLE_DIR: signature by a trusted key, every file's hash, manifest schema.

    Exits non-zero with the file and the reason on the first problem.
    """
    if not trust and not trust_chain:
        raise click.UsageError("give at least one --trust key or --trust-chain certificate")
    vb = verify_mod.verify(bundle_dir, verify_mod.anchors(trust, trust_chain))
    if as_json:
        click.echo(json.dumps(_verified_json(vb), indent=2))
    else:
        click.echo(
            f"OK {vb.manifest.ref} (release {vb.manifest.release}): {len(vb.files)} files verified, "
            f"signed by {vb.signer}"
        )


def _fmt_shape(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@bundle_group.command("inspect")
@click.argument("bundle_dir", type=ExistingDir)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the manifest plus signature facts).")
def bundle_inspect(bundle_dir: pathlib.Path, as_json: bool) -> None:
    """Show what a bundle holds. Does NOT verify it: use `outpost bundle verify`."""
    m = mf.load(bundle_dir)
    sig: dict[str, Any] = (
        oms.signature_summary(bundle_dir / mf.SIGNATURE_NAME)
        if (bundle_dir / mf.SIGNATURE_NAME).exists()
        else {"present": False}
    )
    if as_json:
        click.echo(json.dumps({"manifest": m.to_dict(), "signature": sig}, indent=2))
        return
    lines = [
        f"{m.ref}  release {m.release}  created {m.created}",
        f"  owner: {m.service.owner or '-'}   {m.service.description}".rstrip(),
        f"  slo: p95 {m.service.slo.p95_latency_ms or '-'} ms, max error rate {m.service.slo.max_error_rate}",
        f"  serving: batch <= {m.serving.batching.max_batch_size}, wait <= "
        f"{m.serving.batching.max_queue_delay_ms} ms, engines {' > '.join(m.serving.engines)}, "
        f"{m.serving.precision}",
        f"  runs on: {', '.join(m.constraints.architectures)}; min compute capability "
        f"{m.constraints.min_compute_capability or 'any'}",
    ]
    for model in m.models:
        lines.append(
            f"  model {model.name}: {model.file} ({model.size} bytes, opset {model.opset}) sha256 "
            f"{model.sha256[:16]}..."
        )
        lines += [f"    in  {t.name}: {t.dtype} {_fmt_shape(t.shape)}" for t in model.inputs]
        lines += [f"    out {t.name}: {t.dtype} {_fmt_shape(t.shape)}" for t in model.outputs]
    if m.samples:
        lines.append(f"  samples: {m.samples}")
    for a in m.assets:
        lines.append(f"  asset: {a}")
    if sig.get("present"):
        lines.append(
            f"  signature: model.sig ({sig.get('kind', 'unreadable')}"
            + (f", key {sig['key_hint'][:16]}...)" if sig.get("key_hint") else ")")
        )
    else:
        lines.append("  signature: none (unsigned)")
    click.echo("\n".join(lines))


@bundle_group.command("pack")
@click.argument("bundle_dir", type=ExistingDir)
@click.option(
    "--out", "out_file", type=PathArg, required=True, help="Archive to write (.tar, or .tar.gz/.tgz for gzip)."
)
def bundle_pack(bundle_dir: pathlib.Path, out_file: pathlib.Path) -> None:
    """Pack BUNDLE_DIR into one reproducible archive for transport."""
    archive.pack(bundle_dir, out_file)
    click.echo(f"packed {bundle_dir} -> {out_file} ({os.path.getsize(out_file)} bytes)")


@bundle_group.command("unpack")
@click.argument("archive_file", type=PathArg)
@click.option("--out", "out_dir", type=PathArg, required=True, help="Directory to create.")
@click.option(
    "--max-bytes",
    type=click.IntRange(1),
    default=archive.DEFAULT_MAX_BYTES,
    show_default=True,
    help="Refuse archives that expand past this many bytes.",
)
def bundle_unpack(archive_file: pathlib.Path, out_dir: pathlib.Path, max_bytes: int) -> None:
    """Safely unpack ARCHIVE_FILE (refuses links, devices, '..', absolute paths, bombs).

    Unpacking does not verify: run `outpost bundle verify` on the result.
    """
    archive.unpack(archive_file, out_dir, max_bytes=max_bytes)
    click.echo(f"unpacked {archive_file} -> {out_dir}")


@bundle_group.command("schema")
def bundle_schema() -> None:
    """Print the JSON Schema of outpost.json."""
    click.echo(json.dumps(mf.schema(), indent=2))


COMMANDS = (keys_group, bundle_group)
