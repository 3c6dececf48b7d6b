"""Measuring one step: timing (warm-up, then CUDA events or perf_counter), op counting under
torch.profiler, the machine's copy/matmul ceiling, and the memory helpers (RSS, peak, OOM
recognition, freeing between jobs)."""
from __future__ import annotations

import gc
import os
import resource
import time
from typing import Callable, List, Optional

import torch

from .grid import Settings

OOM_ERRORS = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError, MemoryError}
)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, OOM_ERRORS):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg.lower() or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rss_bytes() -> Optional[int]:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


def max_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_wait_us() -> Optional[int]:
    """Linux pressure stall information: microseconds, since boot, during which at least one runnable
    task waited for a CPU (``some total=`` of ``/proc/pressure/cpu``); None where the kernel has no PSI.
    Read before and after a stretch of time, the difference over the stretch's wall time is the
    fraction of it during which something waited for a core. The benchmark's own threads (at most one
    per core) do not make each other wait, so on a quiet machine it stays near 0; with one other busy
    thread beside a 2-thread job on 2 cores it was 0.50 here (and the job ran 2.3x slower)."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_model() -> Optional[str]:
    """The CPU's model name (``/proc/cpuinfo``), which with the core count tells one host's rows from
    another's when a run is compared with the usual values of this machine."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or None


class MachineWatch:
    """The machine's state over a stretch of CPU timing: the 1-minute load average before and after,
    the fraction of the stretch during which some task waited for a core (:func:`cpu_wait_us`), the
    core count and torch's threads. Rows carry these; ``bench.quiet`` reads them."""

    def __init__(self):
        self.load0 = os.getloadavg()[0]
        self.wait0 = cpu_wait_us()
        self.t0 = time.perf_counter()

    def fields(self) -> dict:
        wall = time.perf_counter() - self.t0
        wait1 = cpu_wait_us()
        out = {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu_model": cpu_model(),
               "loadavg_1m": [round(self.load0, 2), round(os.getloadavg()[0], 2)]}
        if self.wait0 is not None and wait1 is not None and wall > 0:
            out["cpu_wait"] = round(min(1.0, (wait1 - self.wait0) / 1e6 / wall), 4)
        return out


def reset_peak_rss() -> bool:
    """Linux: set this process's peak RSS (VmHWM, which ru_maxrss reads) back to its current RSS
    (``echo 5 > /proc/self/clear_refs``), so that a later :func:`max_rss_bytes` is the peak of what
    ran since: the CPU twin of ``torch.cuda.reset_peak_memory_stats``. False where it cannot."""
    try:  # a kernel control file, not a file of results: no atomic write (it cannot be renamed into)
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
        try:
            os.write(fd, b"5")
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# timing


def _cuda_ms(fn: Callable[[], None]) -> float:
    """One call of ``fn`` between two CUDA events, synchronised after: its device time in ms."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def _quantiles(times_ms: List[float]) -> dict:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"step_ms": q[0], "step_ms_p20": q[1], "step_ms_p80": q[2]}


def time_step(step: Callable[[], None], dev: torch.device, settings: Settings) -> dict:
    """Warm up, then time. GPU: CUDA events around every step, peak from max_memory_allocated
    (reset after warm-up, so it is the steady-state step's peak including everything resident).
    CPU: time.perf_counter around every step; peak RSS of this process over the timed steps (the
    high-water mark reset after warm-up, as on GPU: the steady-state step's peak with everything
    resident; ``lifetime_peak_bytes`` keeps the whole process's, setup transients included)."""
    # The first call apart: Triton compiles and autotunes here (and the caching allocator grows), so
    # first_step_ms is compile + autotune + one step; step_ms below is the steady state only.
    _sync(dev)
    t0 = time.perf_counter()
    first = step()
    _sync(dev)
    first_ms = (time.perf_counter() - t0) * 1e3
    # the loss of the first step, before any update: every method with task vectors starts from the
    # same composition, so its loss0 must equal atlas's (a check that they train the same thing)
    loss0 = float(first.detach().float()) if isinstance(first, torch.Tensor) else None
    del first  # nothing of the step's autograd graph may outlive it (a CUDA-graph capture follows)
    for _ in range(max(0, settings.warmup - 1)):
        step()
    _sync(dev)
    if dev.type == "cuda":
        est_ms = max(_cuda_ms(step), 1e-3)
        n = settings.steps or int(min(50, max(5, round(settings.target_s * 1e3 / est_ms))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda.reset_peak_memory_stats(dev)
        for s, e in events:
            s.record()
            step()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        out = _quantiles(times)
        out.update(peak_bytes=int(torch.cuda.max_memory_allocated(dev)),
                   peak_reserved_bytes=int(torch.cuda.max_memory_reserved(dev)),
                   peak_kind="cuda.max_memory_allocated")
        if settings.graph:
            out.update(time_graph(step, n))
    else:
        n = settings.steps or 5
        lifetime_before = max_rss_bytes()
        reset = reset_peak_rss()
        watch = MachineWatch()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        out = _quantiles(times)
        # the machine may be shared: load average, CPU waits and cores say how much (bench.quiet)
        out.update(peak_bytes=max_rss_bytes(), lifetime_peak_bytes=max(lifetime_before, max_rss_bytes()),
                   peak_kind="ru_maxrss over the timed steps (reset after warm-up)" if reset else "ru_maxrss",
                   **watch.fields())
    out.update(steps_timed=n, warmup=settings.warmup, first_step_ms=first_ms,
               step_times_ms=[round(t, 3) for t in times])  # every timed step: rounds pool them
    if loss0 is not None:
        out["loss0"] = loss0
    return out


def time_graph(step: Callable[[], None], reps: int) -> dict:
    """The same step captured in one CUDA graph and replayed: ``graph_step_ms`` (median of ``reps``
    replays, CUDA events), the step with the host out of the way. Capture needs a step without CPU
    synchronisation (a GradScaler's is one: fp16 rows get ``graph_error``)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = None
        for attempt in range(2):  # a first capture can fail on a lazy initialisation inside it (seen
            try:                  # once on the H200 for the floor at batch 128); the second finds it done
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                break
            except Exception:
                torch.cuda.synchronize()
                if attempt:
                    raise
        graph.replay()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(max(5, reps))]
        for a, b in events:
            a.record()
            graph.replay()
            b.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in events]
        q = _quantiles(times)
        del graph
        return {"graph_step_ms": q["step_ms"], "graph_step_ms_p20": q["step_ms_p20"],
                "graph_step_ms_p80": q["step_ms_p80"]}
    except Exception as e:  # the eager numbers stand without it
        torch.cuda.synchronize()
        return {"graph_error": f"{type(e).__name__}: {str(e)[:200]}"}


def count_ops(step: Callable[[], None], dev: torch.device) -> dict:
    """One more step under torch.profiler: ``launches`` (GPU activities: kernels, memcpy, memset)
    and ``aten_ops`` (aten:: operator calls, nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(dev)
    evs = prof.events()
    out = {"aten_ops": sum(1 for e in evs if e.name.startswith("aten::"))}
    if dev.type == "cuda":
        cuda_t = torch.autograd.DeviceType.CUDA
        out["launches"] = sum(1 for e in evs if getattr(e, "device_type", None) == cuda_t)
    return out


# --------------------------------------------------------------------------------------------
# the ceiling


def measure_ceiling(dev: torch.device) -> dict:
    """Copy bandwidth (bytes read + written per second, in 1e9) and matmul rate (1e12 flop/s):
    GPU: a 1 GiB device-to-device copy and a bf16 8192^3 matmul, CUDA events, medians of 20;
    CPU: a 256 MiB copy and an fp32 2048^3 matmul, perf_counter, medians of 10 and 5."""

    def med(fn, reps, warm=3):
        for _ in range(warm):
            fn()
        _sync(dev)
        ts = []
        for _ in range(reps):
            if dev.type == "cuda":
                ts.append(_cuda_ms(fn) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2]

    gpu = dev.type == "cuda"
    nbytes = (1 << 30) if gpu else (1 << 28)
    n = 8192 if gpu else 2048
    mdt = torch.bfloat16 if gpu else torch.float32

    def copy_time():
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
        dst = torch.empty_like(src)
        return med(lambda: dst.copy_(src), 20 if gpu else 10)

    def mm_time():
        a = torch.randn(n, n, device=dev, dtype=mdt)
        b = torch.randn(n, n, device=dev, dtype=mdt)
        c = torch.empty(n, n, device=dev, dtype=mdt)
        return med(lambda: torch.mm(a, b, out=c), 20 if gpu else 5)

    watch = None if gpu else MachineWatch()
    t_copy = copy_time()
    t_mm = mm_time()
    free_memory()
    out = {
        "copy_gbps": 2 * nbytes / t_copy / 1e9,
        "matmul_tflops": 2 * n**3 / t_mm / 1e12,
        "copy_bytes": nbytes,
        "matmul_n": n,
        "matmul_dtype": str(mdt).replace("torch.", ""),
    }
    if watch is not None:
        out.update(watch.fields())
    return out
