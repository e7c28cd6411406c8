"""Check a decoded request against the model's signature before the engine sees it.

A runtime handed a wrong shape fails with a message about its internals, or
worse, answers garbage; every mistake a caller can make is named here instead,
with the input and what the model expects (a 400 on any transport).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bundle import TensorSpec

from .errors import InvalidRequest, ValidationError
from .protocol import SPEC_DATATYPES, InferRequest, count_non_finite


def _fmt(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class Validator:
    """Turns a request into engine feeds, or raises ValidationError naming the input."""

    def __init__(self, model: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 allow_non_finite: bool = False) -> None:
        self.model = model
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.allow_non_finite = allow_non_finite
        self._input_names = [t.name for t in self.inputs]
        self._output_names = frozenset(t.name for t in self.outputs)
        self._datatypes = {t.name: SPEC_DATATYPES.get(t.dtype, t.dtype) for t in self.inputs}

    def feeds(self, request: InferRequest) -> dict[str, np.ndarray]:
        inputs = request.inputs
        if len(inputs) == 1 and len(self.inputs) == 1 and inputs[0].name == self.inputs[0].name:
            given = {inputs[0].name: inputs[0]}  # the common case: no unknown name to look for
        else:
            given = {i.name: i for i in inputs}
            for name in given:
                if name not in self._datatypes:
                    raise ValidationError(name, f"is not an input of model {self.model!r}; "
                                                f"it expects {self._input_names}")
        dims: dict[str, tuple[int, str]] = {}
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            inp = given.get(spec.name)
            if inp is None:
                raise ValidationError(spec.name, f"is missing; model {self.model!r} expects "
                                                 f"{self._input_names}")
            want = self._datatypes[spec.name]
            if inp.datatype != want:
                raise ValidationError(spec.name, f"expected datatype {want}, got {inp.datatype}")
            data = inp.data
            self._check_shape(spec, data.shape, dims)
            if not self.allow_non_finite:
                bad = count_non_finite((data,))
                if bad:
                    raise ValidationError(spec.name, f"has {bad} non-finite values (NaN/Inf); "
                                                     "this model does not accept them")
            feeds[spec.name] = data
        if request.outputs is not None:
            self.check_outputs(request)
        return feeds

    def check_outputs(self, request: InferRequest) -> None:
        if request.outputs is None:
            return
        seen: set[str] = set()
        for o in request.outputs:
            if o.name not in self._output_names:
                raise InvalidRequest(f"output {o.name!r} is not an output of model {self.model!r}; "
                                     f"it has {sorted(self._output_names)}")
            if o.name in seen:
                raise InvalidRequest(f"output {o.name!r} is requested twice")
            seen.add(o.name)

    def _check_shape(self, spec: TensorSpec, shape: tuple[int, ...], dims: dict[str, tuple[int, str]]) -> None:
        want_shape = spec.shape
        if len(shape) != len(want_shape):
            raise ValidationError(spec.name, f"expected rank {len(want_shape)} (shape {_fmt(want_shape)}), "
                                             f"got shape {_fmt(shape)}")
        for axis, want in enumerate(want_shape):
            got = shape[axis]
            if isinstance(want, int):
                if want != got:
                    raise ValidationError(spec.name, f"dimension {axis} must be {want} (shape {_fmt(want_shape)}), "
                                                     f"got shape {_fmt(shape)}")
                continue
            if got == 0:
                raise ValidationError(spec.name, f"dimension {axis} ({want!r}) is 0; empty tensors are not served")
            seen = dims.get(want)
            if seen is None:
                dims[want] = (got, spec.name)
            elif seen[0] != got:
                raise ValidationError(spec.name, f"dimension {want!r} is {got} here but {seen[0]} in input "
                                                 f"{seen[1]!r}; it must agree across inputs")


def batch_dim(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str | None:
    """The dynamic leading dimension shared by every input and output, if any (what batching merges on)."""
    tensors = (*inputs, *outputs)
    if not tensors or any(not t.shape or not isinstance(t.shape[0], str) for t in tensors):
        return None
    names = {str(t.shape[0]) for t in tensors}
    return names.pop() if len(names) == 1 else None
