"""`outpost engine build|inspect|bench` and `outpost doctor`.

Bundles are verified against `--trust` keys before anything is compiled;
without `--trust` the bundle is only checked against its own manifest (the
developer loop) and a warning says so on stderr. Commands raise
`EngineError`s; `cli.main` prints them as one line and exits 1.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import click

import bundle

from .base import EngineOptions
from .bench import bare_ort_call, bench
from .pipeline import EngineResult, default_cache_dir, open_engine, plan
from .probe import HardwareInfo, SystemProbe
from .registry import AUTO, BACKENDS

ExistingDir = click.Path(exists=True, file_okay=False, path_type=pathlib.Path)
BACKEND_CHOICE = click.Choice([AUTO, *BACKENDS])


def _load_bundle(path: pathlib.Path, trust: Sequence[pathlib.Path]) -> bundle.VerifiedBundle:
    if trust:
        return bundle.verify(path, bundle.anchors(trust))
    click.secho(f"WARNING: {path} is NOT signature-checked (no --trust given); only its manifest hashes are. "
                "Never do this with a bundle you did not build yourself.", fg="red", bold=True, err=True)
    return bundle.load_unverified(path)


def _common(f: Any) -> Any:
    f = click.option("--trust", "trust", multiple=True, type=click.Path(exists=True, dir_okay=False,
                     path_type=pathlib.Path), help="Trusted public key (repeatable); verifies the bundle first.")(f)
    f = click.option("--model", default=None, help="Model of the bundle (default: the first).")(f)
    f = click.option("--backend", type=BACKEND_CHOICE, default=AUTO, show_default=True,
                     help="Backend; auto walks the bundle's preference order over what this machine has.")(f)
    f = click.option("--cache", "cache", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
                     help=f"Engine cache directory [default: $OUTPOST_ENGINE_CACHE or {default_cache_dir()}].")(f)
    f = click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
                     help="Intra-op threads (0 = one per physical core).")(f)
    return f


def _echo_json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _result_doc(result: EngineResult) -> dict[str, Any]:
    return {"backend": result.backend, "cache_hit": result.cache_hit, "load_s": round(result.load_s, 4),
            "build": result.build, "parity": result.parity, "fallbacks": [vars(f) for f in result.fallbacks]}


@click.group("engine")
def engine_group() -> None:
    """Compile bundles into engines, see what would be chosen here, and measure them."""


@engine_group.command("build")
@click.argument("bundle_dir", type=ExistingDir)
@_common
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def build_command(bundle_dir: pathlib.Path, trust: tuple[pathlib.Path, ...], model: str | None, backend: str,
                  cache: pathlib.Path | None, threads: int, as_json: bool) -> None:
    """Build (or find in the cache) the engine for a bundle's model, checked against ORT on the CPU."""
    b = _load_bundle(bundle_dir, trust)
    result = open_engine(b, model, backend, EngineOptions(intra_op_threads=threads), cache)
    result.engine.close()
    if as_json:
        _echo_json(_result_doc(result))
        return
    state = "cache hit (no build, no parity check)" if result.cache_hit else (
        "built, parity NOT checked" if result.parity_note else "built, parity checked")
    click.echo(f"{b.manifest.ref}: {result.backend} engine, {state}, ready in {result.load_s:.3f} s")
    if result.parity_note:
        click.secho(f"  parity {result.parity_note}", fg="yellow")
    elif result.build:
        worst = result.build.get("parity", {}).get("max_abs_error", {})
        click.echo(f"  parity ({result.build['parity']['source']} inputs): max |error| {worst}")
    for f in result.fallbacks:
        click.echo(f"  skipped {f.backend} [{f.kind}]: {f.reason}")


@engine_group.command("inspect")
@click.argument("bundle_dir", type=ExistingDir)
@_common
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_command(bundle_dir: pathlib.Path, trust: tuple[pathlib.Path, ...], model: str | None, backend: str,
                    cache: pathlib.Path | None, threads: int, as_json: bool) -> None:
    """What would be built here, in which order, and why the other backends are out (builds nothing)."""
    b = _load_bundle(bundle_dir, trust)
    p = plan(b, model, backend, EngineOptions(intra_op_threads=threads), cache)
    if as_json:
        _echo_json(p.to_dict())
        return
    click.echo(f"{b.manifest.ref} model {p.model} (sha256 {p.model_sha256[:16]}...), precision {p.precision}")
    click.echo(f"  preference: {', '.join(b.manifest.serving.engines)}; cache: {p.cache_root}")
    if p.profile.dims:
        dims = ", ".join(f"{n}={r.min}..{r.opt}..{r.max}" for n, r in p.profile.dims)
        click.echo(f"  shape profile: {dims}")
    for i, s in enumerate(p.steps, 1):
        note = "cached" if s.cached else f"needs a build{f' ({s.cache_note})' if s.cache_note else ''}"
        click.echo(f"  {i}. {s.backend}: {note}  [{s.key.name}]")
        if s.parity_note:
            click.secho(f"     parity {s.parity_note}", fg="yellow")
    for f in p.skipped:
        click.echo(f"  -  {f.backend} [{f.kind}]: {f.reason}")


def _batches(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of batch sizes, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise click.BadParameter("batch sizes must be positive integers")
    return out


@engine_group.command("bench")
@click.argument("bundle_dir", type=ExistingDir)
@_common
@click.option("--batch", "batch", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--iterations", type=click.IntRange(10, 1_000_000), default=200, show_default=True)
@click.option("--warmup", type=click.IntRange(0, 100_000), default=20, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Time a bare onnxruntime.InferenceSession beside the engine (ort-cpu only).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench_command(bundle_dir: pathlib.Path, trust: tuple[pathlib.Path, ...], model: str | None, backend: str,
                  cache: pathlib.Path | None, threads: int, batch: str, iterations: int, warmup: int,
                  baseline: bool, as_json: bool) -> None:
    """Latency and throughput of the engine chosen here, per batch size."""
    sizes = _batches(batch)
    b = _load_bundle(bundle_dir, trust)
    options = EngineOptions(intra_op_threads=threads)
    result = open_engine(b, model, backend, options, cache)
    p = plan(b, model, result.backend, options, cache, check_cache=False)
    base = None
    if baseline and result.backend == "ort-cpu":
        model_path = p.context.model_path
        base = lambda feeds: bare_ort_call(model_path, options, feeds)  # noqa: E731
    try:
        rows = bench(result.engine, p.profile, [min(s, b.manifest.serving.batching.max_batch_size) for s in sizes],
                     iterations, warmup, base)
    finally:
        result.engine.close()
    if as_json:
        _echo_json({**_result_doc(result), "rows": [r.to_dict() for r in rows]})
        return
    click.echo(f"{b.manifest.ref} model {p.model} on {result.backend} ({'cached' if result.cache_hit else 'built'})")
    head = f"{'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'items/s':>11}"
    click.echo(head + (f" {'bare ORT p50':>13} {'ratio':>6}" if base else ""))
    for r in rows:
        line = f"{r.batch:>5} {r.p50_ms:>9.4f} {r.p90_ms:>9.4f} {r.p99_ms:>9.4f} {r.items_per_s:>11.1f}"
        if r.baseline_p50_ms is not None and r.ratio is not None:
            line += f" {r.baseline_p50_ms:>13.4f} {r.ratio:>6.3f}"
        click.echo(line)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n else "unknown"


def _doctor_lines(hw: HardwareInfo) -> list[str]:
    lines = [f"cpu:          {hw.cpu_name} ({hw.cpu_count} logical cores, {hw.arch}), "
             f"memory {_gib(hw.memory_total_bytes)}"]
    if hw.jetson_model:
        lines.append(f"jetson:       {hw.jetson_model}, L4T {hw.l4t_release or 'unknown'}")
    if not hw.gpus:
        lines.append("gpu:          none detected")
    for i, g in enumerate(hw.gpus):
        lines.append(f"gpu {i}:        {g.name}, compute capability {g.compute_capability}, "
                     f"memory {_gib(g.memory_total_bytes)}{' (shared with the CPU)' if g.integrated else ''}")
    lines += [
        f"driver:       {hw.driver_version or 'none'}",
        f"cuda:         {hw.cuda_version or 'none'}",
        f"tensorrt:     {hw.tensorrt_version or 'not installed'}",
        f"onnxruntime:  {hw.onnxruntime_version or 'not installed'} (providers: {', '.join(hw.ort_providers) or '-'})",
        f"polygraphy:   {'installed' if hw.polygraphy_available else 'not installed'}",
        f"probe source: {hw.source}",
    ]
    lines += [f"note:         {n}" for n in hw.notes]
    return lines


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(as_json: bool) -> None:
    """What this machine has for inference: CPU, GPU, drivers and runtimes."""
    hw = SystemProbe().detect()
    if as_json:
        _echo_json(hw.to_dict())
        return
    for line in _doctor_lines(hw):
        click.echo(line)
