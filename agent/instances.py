"""How many engine instances a model gets, and how many intra-op threads each, when nobody said.

`choose()` is the policy, a pure function of what is known once the first
engine is loaded: the engine kind (CPU or GPU), the cores this process may run
on, the engine's time per batch of one (measured by its build, `engines.batch_scaling`;
else by the configured warm-up), the model's size and the memory available. An
explicit `--instances` / `--threads` (or `[model]` in the daemon's TOML) always
wins; only what was left unset (None) is decided here.

Why these rules:

- GPU engines get one instance. A GPU already runs a batch with all its cores,
  and a second instance is a second copy of weights and workspace in device
  (on Jetson: shared) memory. This is also Triton's default: one instance per
  GPU (docs/user_guide/model_configuration.md, "Multiple Model Instances",
  github.com/triton-inference-server/server).
- CPU, tiny model (a batch under `COMPUTE_BOUND_S`): one instance at the
  runtime's default threads. Such a model runs inline on the event loop
  (`ModelConfig.inline_compute_ms`), so a second instance would only hold
  memory and threads. (The time comes from the build, not from a warm-up in the
  serving process: a warm-up there leaves a batch's arena allocated for good.)
- CPU, compute-bound model, `MIN_CORES_TO_SPLIT` cores or more and memory for the copies:
  `AUTO_INSTANCES` (2) instances, the cores split between them (cores // 2
  intra-op threads each). Triton defaults a KIND_CPU instance group of the
  ONNX Runtime backend to 2 instances (same doc, "CPU Model Instance"; the
  change: triton-inference-server/core PR #82 "Default CPU Instance to 2"), but
  leaves each at the ORT backend's `intra_op_thread_count` default of 0, one
  thread per core (onnxruntime_backend README, "Model Config Options"), so two
  busy instances oversubscribe the cores. ONNX Runtime's own defaults are one
  intra-op thread per physical core, the calling thread taking part, and its
  threading guide points sessions that run in parallel at separate cores or a
  shared pool "to prevent overheated contentions among session thread pools"
  (onnxruntime.ai/docs/performance/tune-performance/threading.html). An
  intra-op pool ends each operator at a barrier: on a 2-core box where the
  event loop thread also needs a core, one preempted ORT thread stalls the
  whole op. Two single-threaded instances have no barrier and keep one batch
  computing while the next one is assembled.
- Memory: each extra instance is assumed to cost `COPY_COST_FACTOR` times the
  model's files (weights plus ORT's pre-packed copies and arena); extra
  instances may take at most `MEMORY_SHARE` of the memory available at load,
  else the model gets one instance.

Measured on a quiet 2-core VM (load average 0.4, no other jobs), `python
bench/instances_bench.py --duration 3 --repeats 2 --configs 1x0,2x1 --retries 0`
(the ~1 GFLOP CNN, image in shared memory): one instance at ORT's threads served
0.82x bare ORT's best images/s at c=8 and a lone request in 5.09 ms (1.21x bare
batch-1); two single-threaded instances 0.65x at c=8 and 9.66 ms (2.28x). An earlier
pass on the same machine under load average 3-7 had put 2 x 1 ahead (1.04-1.07x
against 0.80-0.87x): with other jobs holding a core, one instance's barrier stalled
more than two lone threads did; on a quiet box the second core is better spent
inside one batch. So below `MIN_CORES_TO_SPLIT` cores a compute-bound model keeps
one instance at the runtime's threads; at 8 or more, where one batch's intra-op
speed-up flattens, it gets Triton's two (not measured here: no such machine).
Where a batch runs is not decided here: tiny batches (`ModelConfig.inline_compute_ms`, 0.2 ms)
run on the event loop, the rest on the instances' worker threads. Running the CNN's batches on
the loop too (`--inline-compute-ms 20`: the loop thread becomes one of ORT's, so nothing competes
with it for the cores) was measured both ways on the quiet 2-core box and is not the default:
v2 binary bodies gained (c=8: 186-197 images/s against 165-173), JSON image bodies lost (c=64:
68-71 against 82: their 3.1 MB bodies are read and decoded while a threaded batch computes, and
wait for it on the loop), and health probes under tests/agent/test_http_memory.py's load took
p99 57-67 ms against 20-32 ms.
A "solo" engine at ORT's threads beside two split ones was also tried and dropped:
it cost the CNN 47 MiB of idle RSS and starved the event loop while it ran alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: a batch of one slower than this is compute-bound: a second instance pays for its memory
COMPUTE_BOUND_S = 1e-3
#: instances a compute-bound CPU model gets on a machine with MIN_CORES_TO_SPLIT cores or more
#: (Triton's KIND_CPU default for ONNX Runtime)
AUTO_INSTANCES = 2
#: below this many cores one instance with every core beats a split (measured on 2 cores, see above)
MIN_CORES_TO_SPLIT = 8
#: what one more instance is assumed to cost, in multiples of the model's files
COPY_COST_FACTOR = 2
#: the share of the memory available at load that extra instances may take
MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class Placement:
    """What a model gets: `threads` is intra-op threads per instance (0: the runtime's default, one per core)."""

    instances: int
    threads: int
    #: why, for the log and the model's metadata: "explicit" or "auto: ..."
    reason: str

    def describe(self) -> str:
        """'2 instances x 1 thread (auto: compute-bound, 2 cores)'."""
        inst = f"{self.instances} instance{'s' if self.instances != 1 else ''}"
        thr = "default threads" if self.threads == 0 else f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{inst} x {thr} ({self.reason})"


def choose(*, uses_gpu: bool, cores: int, batch_s: float | None, model_bytes: int, available_bytes: int,
           instances: int | None = None, threads: int | None = None) -> Placement:
    """The placement of one model; `instances` / `threads` None means auto, a number is kept as given.

    `batch_s` is the engine's time for a batch of one (None: not measured,
    e.g. the model rejected every synthesized input); `available_bytes` 0 means unknown.
    """
    if instances is not None and threads is not None:
        return Placement(instances, threads, "explicit")
    if instances is not None:
        count, why = instances, "explicit instances"
    elif uses_gpu:
        count, why = 1, "auto: GPU engine"
    else:
        count, why = _cpu_instances(cores, batch_s, model_bytes, available_bytes, threads)
    if threads is not None:
        return Placement(count, threads, f"{why}; explicit threads")
    # one instance: the runtime's default (a thread per core); several: the cores split between them
    split = 0 if count == 1 or uses_gpu else max(1, cores // count)
    return Placement(count, split, why)


def _cpu_instances(cores: int, batch_s: float | None, model_bytes: int, available_bytes: int,
                   threads: int | None) -> tuple[int, str]:
    if batch_s is None:
        return 1, "auto: time per batch unknown"
    if batch_s < COMPUTE_BOUND_S:
        return 1, f"auto: tiny, {batch_s * 1e3:.2f} ms per batch"
    if cores < MIN_CORES_TO_SPLIT:
        return 1, f"auto: compute-bound, {cores} core{'s' if cores != 1 else ''}: one instance on all of them"
    per_instance = threads if threads else 1  # explicit 0 (a thread per core) leaves room for one
    count = max(1, min(AUTO_INSTANCES, cores // per_instance)) if threads != 0 else 1
    if count > 1 and available_bytes and (count - 1) * COPY_COST_FACTOR * model_bytes > MEMORY_SHARE * available_bytes:
        return 1, (f"auto: compute-bound, but {_mib(available_bytes)} MiB available is short for "
                   f"another {_mib(model_bytes)} MiB copy")
    return count, f"auto: compute-bound, {batch_s * 1e3:.1f} ms per batch, {cores} cores"


def _mib(n: int) -> int:
    return round(n / 2**20)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, systemd CPUAffinity=), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes available for new allocations now (0: unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unreadable /proc: the memory rule then does not apply
        return 0
