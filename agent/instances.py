"""How many engine instances a model gets, and how many intra-op threads each, when nobody said.

`choose()` is the policy, a pure function of what is known once the first
engine is loaded: the engine kind (CPU or GPU), the cores this process may run
on, the engine's measured time per batch at warm-up, the model's size and the
memory available. An explicit `--instances` / `--threads` (or `[model]` in the
daemon's TOML) always wins; only what was left unset (None) is decided here.

Why these rules:

- GPU engines get one instance. A GPU already runs a batch with all its cores,
  and a second instance is a second copy of weights and workspace in device
  (on Jetson: shared) memory. This is also Triton's default: one instance per
  GPU (docs/user_guide/model_configuration.md, "Multiple Model Instances",
  github.com/triton-inference-server/server).
- CPU, tiny model (warm-up batch under `COMPUTE_BOUND_S`): one instance at the
  runtime's default threads. Such a model runs inline on the event loop
  (`ModelConfig.inline_compute_ms`), so a second instance would only hold
  memory and threads. (The timing warm-up itself leaves ORT's first arena
  chunk allocated, which a first request would allocate anyway: the MLP's
  idle RSS is 103.5 MiB against 100.7 without it, 1.19x a minimal aiohttp
  server's 87 MiB.)
- CPU, compute-bound model, at least 2 cores and memory for the copies:
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
A "solo" engine at ORT's threads beside two split ones was also tried and dropped:
it cost the CNN 47 MiB of idle RSS and starved the event loop while it ran alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: a warm-up batch slower than this is compute-bound: a second instance pays for its memory
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

    `batch_s` is the engine's best time per batch at warm-up (None: not measured,
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
        return 1, "auto: warm-up time unknown"
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


#: a batch faster than this runs on the event loop wherever: a thread hand-off would cost more
TINY_INLINE_MS = 0.2
#: a CPU engine with every core runs batches up to this long on the event loop. A health probe on a new
#: connection needs 4-6 turns of the loop, each of which may follow one batch: under full load it
#: waits up to about 5 x this (tests/agent/test_http_memory.py: p99 57-67 ms with the CNN's ~9 ms
#: batches, against 20-32 ms on workers; its bound is 100 ms)
CPU_INLINE_CAP_MS = 20.0


def inline_threshold_ms(configured: float | None, *, uses_gpu: bool, placement: Placement) -> float:
    """Batches whose engine time stays below this run on the event loop thread instead of a worker.

    Why not always a worker thread: on a CPU engine that has every core (one instance at the
    runtime's threads), a worker leaves the loop thread free to compete with the engine's own
    threads for the cores, and each preemption stalls an operator's barrier. Run on the loop,
    the loop thread is one of the engine's threads and network bytes wait in the kernel until
    the batch is done. Measured on 2 cores (bench/README.md, "Engine instances on the CPU"),
    CNN v2 binary bodies: 206-217 images/s on the loop against 180-193 on a worker at c=1,
    214-216 against 182-187 at c=8 (bare ORT: about 220). Capped at `CPU_INLINE_CAP_MS` a batch so
    that health probes and other connections are not kept waiting long for the loop. GPU engines
    and split instances keep workers: there the waiting is on the device or on other instances.
    """
    if configured is not None:
        return configured
    if uses_gpu or placement.instances > 1 or placement.threads not in (0, available_cores()):
        return TINY_INLINE_MS
    return CPU_INLINE_CAP_MS


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
