"""Memory probe: CPU budget search with torch-profiler peaks, real model step, JSON cache."""

from __future__ import annotations

import json

import torch

from model_code.conformer import ConformerCTC
from model_code.memory_probe import probe_batch_sizes, search_max_batch


def test_search_max_batch_finds_threshold():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 37

    best, fail = search_max_batch(fits, max_batch_size=1000, tolerance=0.0)
    assert best == 37 and fail == 38
    assert len(calls) < 15
    assert search_max_batch(lambda b: True, max_batch_size=20)[0] == 20
    assert search_max_batch(lambda b: False, max_batch_size=20) == (0, 1)
    # a known failing size bounds the search from above
    best, _ = search_max_batch(lambda b: b <= 5, max_batch_size=100, upper_fail=8, tolerance=0.0)
    assert best == 5


def test_cpu_budget_with_profiled_peak():
    """A step that allocates b·d units at its peak: the probe recovers budget / (b·d)."""
    unit = 64 * 1024

    def step(b, d):
        x = torch.ones(int(b * d * unit) // 4, dtype=torch.float32)  # b·d units live at once
        y = x * 2  # another b·d units: peak 2·b·d units
        del x, y

    sizes = probe_batch_sizes(step, [1.0, 2.0, 4.0], "cpu", memory_budget_gb=80 * unit / 2**30,
                              safety=1.0, max_batch_size=100, tolerance=0.0)
    # peak = 2·b·d units <= 80 units  →  b <= 40/d (allocator overhead may cost one)
    assert 39 <= sizes[0] <= 40
    assert 19 <= sizes[1] <= 20
    assert 9 <= sizes[2] <= 10


def test_real_model_probe_and_cache(tmp_path):
    torch.set_num_threads(1)
    kw = dict(n_mels=20, vocab_size=29, d_model=16, n_layers=1, n_heads=2, ff_mult=2, conv_kernel=3,
              dropout=0.0, subsampling_channels=4)
    cache = tmp_path / "probe.json"
    args = dict(model_factory=lambda: ConformerCTC(**kw), max_batch_size=16, cache_path=cache,
                model_config=kw, tolerance=0.25)
    sizes = probe_batch_sizes(None, [1.0, 6.0], "cpu", 0.006, **args)  # ~6 MiB budget
    assert len(sizes) == 2 and all(1 <= s <= 16 for s in sizes)
    assert sizes[0] >= sizes[1]  # longer utterances → no larger batches
    assert sizes[1] < 16  # the budget binds for 6 s utterances
    data = json.loads(cache.read_text())
    (entry,) = data.values()
    assert entry["batch_sizes"] == sizes and entry["hardware"].startswith("cpu:")

    def boom():
        raise AssertionError("a cached result must not build a model")

    assert probe_batch_sizes(None, [1.0, 6.0], "cpu", 0.006, **dict(args, model_factory=boom)) == sizes
