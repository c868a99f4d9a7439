"""Largest trainable batch size per duration bucket (like NeMo's OOMptimizer), cached as JSON.

For each bucket's longest duration, a search runs one real training step (forward + CTC loss +
backward + optimizer step) on random features of that duration and finds the largest batch
size that fits:

* **GPU** (``device="cuda..."``): a step "fits" if it raises no CUDA out-of-memory error and its
  peak allocated memory (``torch.cuda.max_memory_allocated``) stays within
  ``memory_budget_gb × safety`` (the budget is capped at the device's total memory).
* **CPU**: no OOM to hit, so the same search runs against ``memory_budget_gb × safety``, using the
  peak *tensor* memory of the step measured with torch's profiler (``profile_memory=True``: the
  allocation/free events are replayed in time order and the running total's maximum taken),
  plus the memory held before the step (parameters, buffers, optimizer state). If the profiler's
  event API is unavailable, the process RSS peak (psutil, sampled in a thread) is used.

Search: batch sizes double until a step does not fit, then bisection between the last size that
fit and the first that did not. Buckets are probed from short to long and a longer bucket never
tries a size that already failed for a shorter one (cost grows with duration).

The result is cached in a JSON file keyed by a hash of (model config, hardware string, bucket
durations, budget, search settings): a second call with the same key does no work.

With the sampler::

    sampler = DynamicBucketingSampler(durations, max_duration_s, num_buckets, ...)
    sizes = probe_batch_sizes(None, sampler.bucket_max_durations(), device, budget_gb,
                              model_factory=lambda: ConformerCTC(**kw), cache_path=..., model_config=kw)
    sampler.set_bucket_batch_sizes(sizes)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

StepFn = Callable[[int, float], None]  # (batch_size, duration_s) → runs one training step


# ----------------------------------------------------------------------------- hardware / cache
def hardware_string(device: str = "cpu") -> str:
    """Readable identity of the memory the probe ran against (part of the cache key)."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        return f"cuda:{props.name}:{props.total_memory // 2**20}MiB:torch{torch.__version__}"
    try:
        import psutil

        mem = psutil.virtual_memory().total // 2**20
    except Exception:  # pragma: no cover - psutil is a dependency of our dependencies
        mem = 0
    return f"cpu:{platform.machine()}:{os.cpu_count()}cores:{mem}MiB:torch{torch.__version__}"


def cache_key(model_config: dict[str, Any], hardware: str, extra: dict[str, Any]) -> str:
    blob = json.dumps({"model": model_config, "hardware": hardware, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- measuring
def _profiled_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak live tensor bytes allocated during ``fn()`` (CPU), from torch profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - private API moved: use RSS instead
        return _rss_peak_bytes(fn)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and str(e.extra_fields.device.type) == "cpu":
            allocs.append((e.start_time_ns, int(e.extra_fields.alloc_size)))
        stack.extend(e.children)
    if not allocs:
        return _rss_peak_bytes(fn)
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak


def _rss_peak_bytes(fn: Callable[[], None]) -> int:
    """Fallback: peak process RSS above the level before ``fn()``, sampled every ~1 ms."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(peak - base, 0)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _fits_factory(step_fn: StepFn, device: str, budget_bytes: float, held_bytes: Callable[[], int]
                  ) -> Callable[[int, float], tuple[bool, int]]:
    import torch

    gpu = str(device).startswith("cuda")

    def fits(batch_size: int, duration_s: float) -> tuple[bool, int]:
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                step_fn(batch_size, duration_s)
                torch.cuda.synchronize(device)
            except Exception as exc:  # noqa: BLE001 - only OOM is a "does not fit"
                if not _is_oom(exc):
                    raise
                torch.cuda.empty_cache()
                return False, -1
            peak = int(torch.cuda.max_memory_allocated(device))
            return peak <= budget_bytes, peak
        peak = held_bytes() + _profiled_peak_bytes(lambda: step_fn(batch_size, duration_s))
        return peak <= budget_bytes, peak

    return fits


# ----------------------------------------------------------------------------- the search
def search_max_batch(fits: Callable[[int], bool], max_batch_size: int, upper_fail: int | None = None,
                     tolerance: float = 0.05) -> tuple[int, int | None]:
    """Largest b in [1, max_batch_size] with ``fits(b)`` (assumed monotone) → (b, first failing b).

    Doubling from 1 until failure (or ``upper_fail``, a size known to fail), then bisection until
    the gap is within ``tolerance`` of the answer. Returns (0, 1) if even 1 does not fit.
    """
    lo, hi = 0, upper_fail
    b = 1
    while hi is None:
        if b > max_batch_size:
            return max_batch_size if lo >= max_batch_size else lo, None
        if fits(b):
            lo = b
            if b == max_batch_size:
                return lo, None
            b = min(b * 2, max_batch_size)
        else:
            hi = b
    while hi - lo > max(1, int(lo * tolerance)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def probe_batch_sizes(
    step_fn: StepFn | None = None,
    bucket_max_durations: Sequence[float] = (),
    device: str = "cpu",
    memory_budget_gb: float = 4.0,
    *,
    model_factory: Callable[[], Any] | None = None,
    n_mels: int | None = None,
    vocab_size: int | None = None,
    max_batch_size: int = 512,
    safety: float = 0.9,
    tolerance: float = 0.05,
    cache_path: str | os.PathLike[str] | None = None,
    model_config: dict[str, Any] | None = None,
) -> list[int]:
    """Max batch size per bucket (one int per entry of ``bucket_max_durations``, each ≥ 1).

    Give either ``step_fn(batch_size, duration_s)`` (runs one training step; the caller owns the
    model and optimizer) or ``model_factory()`` (returns a fresh ``ConformerCTC``; a CTC step with
    AdamW on random data is built by :func:`ctc_step_fn`). ``memory_budget_gb × safety`` is the
    limit (on GPU also capped by the device's memory). With ``cache_path`` and ``model_config``
    (JSON-able, e.g. the model kwargs) results are cached under
    ``cache_key(model_config, hardware_string(device), ...)``.
    """
    durations = [float(d) for d in bucket_max_durations]
    key = None
    if cache_path is not None and model_config is not None:
        hw = hardware_string(device)
        key = cache_key(model_config, hw, {"durations": durations, "budget_gb": memory_budget_gb,
                                           "safety": safety, "max_batch_size": max_batch_size,
                                           "tolerance": tolerance})
        cached = _read_cache(Path(cache_path)).get(key)
        if cached is not None:
            return list(cached["batch_sizes"])

    import torch

    held: Callable[[], int] = lambda: 0  # noqa: E731
    if step_fn is None:
        if model_factory is None:
            raise ValueError("give step_fn or model_factory")
        model = model_factory().to(device)
        step_fn, held = ctc_step_fn(model, device, n_mels=n_mels, vocab_size=vocab_size)
    budget = memory_budget_gb * 2**30
    if str(device).startswith("cuda"):
        budget = min(budget, torch.cuda.get_device_properties(torch.device(device)).total_memory)
    budget *= safety
    fits_at = _fits_factory(step_fn, device, budget, held)
    step_fn(1, min(durations) if durations else 1.0)  # warm-up: allocates optimizer state etc.

    upper_fail: int | None = None
    order = sorted(range(len(durations)), key=lambda i: durations[i])
    result: dict[int, int] = {}
    for i in order:
        d = durations[i]
        peaks: dict[int, int] = {}

        def fits(b: int, d: float = d, peaks: dict[int, int] = peaks) -> bool:
            ok, peak = fits_at(b, d)
            peaks[b] = peak
            return ok

        best, fail = search_max_batch(fits, max_batch_size, upper_fail, tolerance)
        if best < 1:
            log.warning("memory probe: one %.1f s utterance exceeds the budget; using batch size 1", d)
            best = 1
        log.info("memory probe: %.1f s → batch %d (peak %.1f MiB)", d, best, peaks.get(best, 0) / 2**20)
        result[i] = best
        if fail is not None:
            upper_fail = fail
    out = [result[i] for i in range(len(durations))]

    if key is not None:
        data = _read_cache(Path(cache_path))
        data[key] = {"batch_sizes": out, "durations": durations, "hardware": hardware_string(device),
                     "memory_budget_gb": memory_budget_gb, "model_config": model_config,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_cache(Path(cache_path), data)
    return out


def ctc_step_fn(model, device: str = "cpu", n_mels: int | None = None, vocab_size: int | None = None,
                frames_per_s: int = 100, tokens_per_s: float = 15.0, lr: float = 1e-4
                ) -> tuple[StepFn, Callable[[], int]]:
    """A training step on random data for ``model`` (a ``ConformerCTC``) → (step_fn, held_bytes).

    ``step_fn(b, d)``: feats (b, d·frames_per_s, n_mels), targets (b, ~d·tokens_per_s) → CTC loss,
    backward, AdamW step, grads freed. ``held_bytes()`` = parameters + buffers + optimizer state
    (memory that exists before and after the step and so is not seen by the step's profile).
    """
    import torch

    n_mels = n_mels or model.n_mels
    vocab_size = vocab_size or model.vocab_size
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(b: int, d: float) -> None:
        t = max(int(d * frames_per_s), 8)
        n_tok = max(min(int(d * tokens_per_s), t // 4 - 1), 1)
        feats = torch.randn(b, t, n_mels, device=device)
        lengths = torch.full((b,), t, dtype=torch.long, device=device)
        targets = torch.randint(1, vocab_size, (b, n_tok), device=device)
        lp, out_len = model(feats, lengths)
        loss = torch.nn.functional.ctc_loss(lp.transpose(0, 1).float(), targets, out_len,
                                            torch.full((b,), n_tok, dtype=torch.long, device=device),
                                            zero_infinity=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def held() -> int:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        total += sum(x.numel() * x.element_size() for x in model.buffers())
        for st in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return total

    return step, held
