"""The child-process runner: a crash, hang or OOM in the child is a typed error in the caller."""

from __future__ import annotations

import pytest

from engines import BuildCrashed, BuildTimeout, OutOfMemory
from engines.isolate import run_isolated


def test_result_comes_back() -> None:
    assert run_isolated("tests.engines.crashers:echo", {"a": [1, 2]}, 60) == {"echo": {"a": [1, 2]}}


@pytest.mark.parametrize(("target", "signal"), [("abort", "SIGABRT"), ("segfault", "SIGSEGV")])
def test_child_killed_by_a_signal_is_a_crashed_build(target: str, signal: str) -> None:
    with pytest.raises(BuildCrashed, match=signal):
        run_isolated(f"tests.engines.crashers:{target}", {}, 60)


def test_child_that_exits_without_a_result_is_a_crashed_build() -> None:
    with pytest.raises(BuildCrashed, match="exited with status 3"):
        run_isolated("tests.engines.crashers:exit_silently", {}, 60)


def test_child_past_its_deadline_is_killed() -> None:
    with pytest.raises(BuildTimeout, match="ran past 1 s"):
        run_isolated("tests.engines.crashers:hang", {}, 1)


def test_out_of_memory_is_recognised_whatever_the_exception_type() -> None:
    with pytest.raises(OutOfMemory) as info:
        run_isolated("tests.engines.crashers:oom", {}, 60)
    assert info.value.kind == "out-of-memory"
