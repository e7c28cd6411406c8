"""Tensors by reference: read inputs out of, and write outputs into, one client's regions.

`ClientRegions` is what the protocol decoder calls for an input whose
parameters name a region (`agent.protocol.RegionReader`): it returns a
read-only view of the slot, which the decoder wraps with `np.frombuffer`,
so an input is never copied (unless misaligned for its dtype). Outputs are
planned before the model runs (every slot inside its region, writable, no
two overlapping) and written after it (`np.copyto` into the mapping), so a
bad output reference costs no compute.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent import protocol
from agent.protocol import InferRequest, InferResponse, OutputTensor

from .registry import Region, RegionError, RegionTable

REGION, OFFSET, BYTE_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"


@dataclass(slots=True)
class Slot:
    """`byte_size` bytes at `offset` within a region."""

    tensor: str
    region: Region
    offset: int
    byte_size: int

    @property
    def start(self) -> int:
        """Offset within the object (what two regions on one object are compared by)."""
        return self.region.offset + self.offset

    @property
    def stop(self) -> int:
        return self.start + self.byte_size


def _int_param(params: Mapping[str, Any], key: str, what: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if type(value) is not int or value < 0:
        raise RegionError(f"{what}: '{key}' must be a non-negative integer, got {value!r}")
    return value


class ClientRegions:
    """One owner's view of the region table, for one request."""

    def __init__(self, table: RegionTable, owner: str) -> None:
        self.table = table
        self.owner = owner

    def slot(self, what: str, tensor: str, params: Mapping[str, Any]) -> Slot:
        region = self.table.get(self.owner, params.get(REGION))
        offset = _int_param(params, OFFSET, f"{what} {tensor!r}", 0)
        size = _int_param(params, BYTE_SIZE, f"{what} {tensor!r}")
        if offset + size > region.byte_size:
            raise RegionError(f"{what} {tensor!r}: offset {offset} + byte_size {size} runs past the end of "
                              f"shared-memory region {region.name!r} ({region.byte_size} bytes)")
        return Slot(tensor, region, offset, size)

    def input_view(self, tensor: str, params: Mapping[str, Any]) -> memoryview:
        """The input's bytes, read-only, straight from the mapping."""
        s = self.slot("input", tensor, params)
        try:
            return s.region.input_bytes(s.start, s.start + s.byte_size)
        except ValueError:  # unregistered (and unmapped) by another thread just now
            raise RegionError(f"shared-memory region {s.region.name!r} was unregistered") from None

    def plan_outputs(self, request: InferRequest) -> OutputPlacement:
        """Check every output slot before the model runs: bounds, writable, no overlaps."""
        slots = [self.slot("output", o.name, o.parameters)
                 for o in request.outputs or () if REGION in o.parameters]
        if not slots:
            return _NOTHING
        by_object: dict[tuple[int, int], list[Slot]] = {}
        for s in slots:
            by_object.setdefault(s.region.identity, []).append(s)
        for same in by_object.values():
            same.sort(key=lambda s: s.start)
            for a, b in itertools.pairwise(same):
                if b.start < a.stop:
                    raise RegionError(f"outputs {a.tensor!r} and {b.tensor!r} overlap in shared memory "
                                      f"(bytes {b.start}..{min(a.stop, b.stop)} of object {a.region.key!r}); "
                                      "give each output its own slot")
        for s in slots:
            s.region.output_bytes()
        return OutputPlacement({s.tensor: s for s in slots})


@dataclass(slots=True)
class OutputPlacement:
    slots: Mapping[str, Slot]

    def write(self, response: InferResponse) -> InferResponse:
        """Copy each planned output into its slot; the response then only points there."""
        if not self.slots:
            return response
        outs = []
        for out in response.outputs:
            s = self.slots.get(out.name)
            if s is None:
                outs.append(out)
                continue
            arr = out.data
            if arr.dtype.kind in "OUS":
                src = np.frombuffer(protocol._to_binary(arr), dtype=np.uint8)  # the v2 BYTES framing
            elif arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
                src = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            else:
                src = arr
            nbytes = src.nbytes
            if nbytes > s.byte_size:
                raise RegionError(f"output {out.name!r} is {nbytes} bytes (shape {list(arr.shape)}); its "
                                  f"shared-memory slot in region {s.region.name!r} holds {s.byte_size}")
            # the mapping starts at byte 0 of the object, so the slot's object offset is its mapping offset
            np.copyto(s.region.output_bytes()[s.start:s.start + nbytes], src.reshape(-1).view(np.uint8))
            ref = {REGION: s.region.name, BYTE_SIZE: nbytes}
            if s.offset:
                ref[OFFSET] = s.offset
            # constructed, not dataclasses.replace'd: a third of this method's time on a small model
            outs.append(OutputTensor(out.name, arr, out.binary, ref))
        return InferResponse(response.model_name, response.model_version, tuple(outs), response.id,
                             response.parameters)


_NOTHING = OutputPlacement({})
