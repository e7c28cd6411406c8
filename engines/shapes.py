"""Shape profiles: the sizes an engine is built for, from the manifest's dynamic dims.

TensorRT needs a (min, opt, max) range for every dynamic dimension at build
time, the parity check needs concrete inputs, and the engine cache must tell
two builds for different ranges apart. All three read the same
`ShapeProfile`, so they cannot disagree.

A named dimension that leads some input is the batch dimension: its range is
1 .. the manifest's `max_batch_size`. Any other named dimension (height,
width, sequence length) gets the range the caller configured in
`EngineOptions.dim_ranges`, or `DEFAULT_DIM_RANGE`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bundle import TensorSpec

#: (min, opt, max) for a non-batch dynamic dimension nobody configured.
DEFAULT_DIM_RANGE = (1, 64, 1024)
#: The batch size TensorRT tunes its kernels for, when the manifest allows it.
OPT_BATCH = 8
#: Concrete sizes for generated parity inputs: small, so the check stays cheap,
#: but a batch of 2 so that batching bugs show up.
SAMPLE_BATCH = 2
SAMPLE_DIM_CAP = 32


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int
    batch: bool = False

    @property
    def sample(self) -> int:
        cap = SAMPLE_BATCH if self.batch else SAMPLE_DIM_CAP
        return max(self.min, min(self.opt, cap))


@dataclass(frozen=True)
class ShapeProfile:
    """Ranges of every named dim, sorted by name (hashable, stable in cache keys)."""

    dims: tuple[tuple[str, DimRange], ...] = ()

    def range(self, name: str) -> DimRange:
        for n, r in self.dims:
            if n == name:
                return r
        raise KeyError(name)

    def shape(self, spec: TensorSpec, which: str) -> tuple[int, ...]:
        """Concrete shape of `spec` at "min", "opt", "max" or "sample"."""
        return tuple(d if isinstance(d, int) else int(getattr(self.range(d), which)) for d in spec.shape)

    def shapes(self, specs: Sequence[TensorSpec], which: str) -> dict[str, tuple[int, ...]]:
        return {s.name: self.shape(s, which) for s in specs}

    def to_key(self) -> list[list[object]]:
        return [[n, r.min, r.opt, r.max] for n, r in self.dims]


def profile_for(inputs: Sequence[TensorSpec], max_batch_size: int,
                overrides: Mapping[str, tuple[int, int, int]] | None = None) -> ShapeProfile:
    overrides = dict(overrides or {})
    batch_dims = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)}
    ranges: dict[str, DimRange] = {}
    for spec in inputs:
        for d in spec.dynamic_dims:
            if d in ranges:
                continue
            if d in overrides:
                lo, opt, hi = overrides[d]
                ranges[d] = DimRange(lo, opt, hi, batch=d in batch_dims)
            elif d in batch_dims:
                top = max(1, max_batch_size)
                ranges[d] = DimRange(1, min(OPT_BATCH, top), top, batch=True)
            else:
                ranges[d] = DimRange(*DEFAULT_DIM_RANGE)
    for name, r in ranges.items():
        if not 1 <= r.min <= r.opt <= r.max:
            raise ValueError(f"dimension {name!r}: need 1 <= min <= opt <= max, got {r.min}, {r.opt}, {r.max}")
    return ShapeProfile(tuple(sorted(ranges.items())))
