"""Run a function in a fresh Python process, so that a crash there is an error here (THREATS #21).

A model can crash a runtime outright (a segfault in a parser, an abort in a
CUDA kernel): Python cannot catch that in-process. The first build, load and
inference of a never-seen model therefore run in a child started with
`python -m engines.isolate MODULE:FUNCTION`: the payload goes in as JSON on
stdin, the result comes back as one marked JSON line on stdout. A typed
engines error raised in the child is re-raised here with the same type; a
child killed by a signal becomes `BuildCrashed`, one that overruns its time
`BuildTimeout`. A subprocess, not multiprocessing's fork: a forked child would
inherit CUDA state and locks of a serving parent.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from . import errors
from .errors import BuildCrashed, BuildTimeout, EngineBuildError, EngineError, OutOfMemory

RESULT_MARK = "@@outpost-isolate-result@@ "
_TAIL_CHARS = 2000
#: runtime messages that mean memory ran out (host or device), whatever the runtime's exception type
_OOM_MARKERS = ("out of memory", "out_of_memory", "failed to allocate", "bad_alloc", "cudaerrormemoryallocation")


def _package_root() -> str:
    return str(pathlib.Path(__file__).resolve().parent.parent)


def run_isolated(target: str, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Call `target` ("module:function") with `payload` in a child process; return its result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", "engines.isolate", target], input=json.dumps(payload),
                              capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise BuildTimeout(f"the isolated build ran past {timeout_s:g} s and was killed{_tail(e.stderr)}") from None
    if proc.returncode < 0:
        sig = _signal_name(-proc.returncode)
        raise BuildCrashed(f"the isolated build crashed the runtime ({sig}){_tail(proc.stderr)}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            break
    else:
        raise BuildCrashed(f"the isolated build exited with status {proc.returncode} and no result"
                           f"{_tail(proc.stderr)}")
    if "error" in result:
        raise _error_from(result["error"])
    return dict(result["ok"])


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _tail(text: str | bytes | None) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return f": {text[-_TAIL_CHARS:]}" if text else ""


def _error_from(err: dict[str, Any]) -> EngineError:
    cls = getattr(errors, str(err.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, EngineError)):
        cls = EngineBuildError
    return cls(str(err.get("message")))


def classify(e: BaseException) -> EngineError:
    """A child-side exception as the engines error the parent should see."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, MemoryError) or any(m in text.lower() for m in _OOM_MARKERS):
        return OutOfMemory(f"out of memory: {text[:1500]}")
    if isinstance(e, EngineError):
        return e
    return EngineBuildError(f"{type(e).__name__}: {text[:1500]}")


def _child_main(target: str) -> int:
    module, attr = target.split(":")
    payload = json.loads(sys.stdin.read())
    try:
        func: Callable[[dict[str, Any]], dict[str, Any]] = getattr(importlib.import_module(module), attr)
        result: dict[str, Any] = {"ok": func(payload)}
    except Exception as e:
        err = classify(e)
        result = {"error": {"type": type(err).__name__, "message": str(err)}}
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
