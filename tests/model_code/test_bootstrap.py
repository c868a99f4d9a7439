"""Paired bootstrap of a WER difference (Bisani & Ney 2004)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_code.bootstrap import block_sums, bootstrap_wer_ci, paired_bootstrap


def _naive(ea, eb, n, blocks, n_samples, seed):
    """Reference loop implementation with the same RNG draws as the vectorized one."""
    ea_b, eb_b, n_b, _ = block_sums(ea, eb, n, blocks)
    k = len(n_b)
    rng = np.random.default_rng(seed)
    out = []
    idx_all = rng.integers(0, k, size=(n_samples, k))
    for idx in idx_all:
        out.append((sum(ea_b[i] for i in idx) - sum(eb_b[i] for i in idx)) / sum(n_b[i] for i in idx))
    return np.array(out)


def test_identical_systems_are_never_better():
    e = [1, 0, 3, 2, 0, 1]
    n = [5, 4, 6, 5, 3, 4]
    r = paired_bootstrap(e, e, n, n_samples=300, seed=1)
    assert r["delta"] == 0.0
    assert r["ci95"] == [0.0, 0.0]
    assert r["p_better"] == 0.0 and r["p_worse"] == 0.0


def test_uniformly_better_system_has_probability_one():
    n = [10] * 20
    eb = [4] * 20
    ea = [1] * 20
    r = paired_bootstrap(ea, eb, n, n_samples=200, seed=0)
    assert r["delta"] == pytest.approx(-0.3)
    assert r["p_better"] == 1.0
    assert r["ci95"][1] < 0
    # a margin larger than the improvement makes it "not better by enough"
    assert paired_bootstrap(ea, eb, n, n_samples=200, seed=0, margin=0.5)["p_better"] == 0.0


def test_matches_reference_loop_and_is_deterministic():
    rng = np.random.default_rng(3)
    n = rng.integers(1, 12, size=40)
    ea = rng.binomial(n, 0.3)
    eb = rng.binomial(n, 0.4)
    spk = [f"s{i % 7}" for i in range(40)]
    r1 = paired_bootstrap(ea, eb, n, blocks=spk, n_samples=500, seed=11, chunk=64)
    r2 = paired_bootstrap(ea, eb, n, blocks=spk, n_samples=500, seed=11, chunk=64)
    assert r1 == r2
    ref = _naive(ea, eb, n, spk, 500, 11)
    # chunked draws consume the generator in the same order as one (500, K) draw
    assert r1["ci95"] == pytest.approx(list(np.percentile(ref, [2.5, 97.5])))
    assert r1["p_better"] == pytest.approx(float(np.mean(ref < 0)))
    assert r1["n_blocks"] == 7


def test_speaker_blocks_widen_the_interval_for_correlated_errors():
    # speaker 0's utterances are all much worse for A, the others slightly better: the
    # utterance bootstrap treats 10 correlated utterances as independent evidence.
    n = [10] * 40
    ea = [9] * 10 + [2] * 30
    eb = [3] * 10 + [3] * 30
    spk = [f"s{i // 10}" for i in range(40)]
    utt = paired_bootstrap(ea, eb, n, n_samples=2000, seed=0)
    blk = paired_bootstrap(ea, eb, n, blocks=spk, n_samples=2000, seed=0)
    assert utt["delta"] == blk["delta"]
    assert (blk["ci95"][1] - blk["ci95"][0]) > 1.5 * (utt["ci95"][1] - utt["ci95"][0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1], [3, 3])
    with pytest.raises(ValueError):
        paired_bootstrap([0], [0], [0])
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1, 2], [3, 3], blocks=["a"])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(1, 8)), min_size=1, max_size=25),
    st.integers(0, 1000),
)
def test_interval_brackets_replicates_and_observed_delta_is_exact(rows, seed):
    ea, eb, n = (list(x) for x in zip(*rows, strict=True))
    r = paired_bootstrap(ea, eb, n, n_samples=100, seed=seed)
    assert r["delta"] == pytest.approx((sum(ea) - sum(eb)) / sum(n))
    assert r["ci95"][0] <= r["ci95"][1]
    assert 0.0 <= r["p_better"] <= 1.0 and r["p_better"] + r["p_worse"] <= 1.0 + 1e-12
    lo, hi = bootstrap_wer_ci(ea, n, n_samples=100, seed=seed)
    # a WER interval lies between the best and the worst single utterance's WER
    ratios = [a / b for a, b in zip(ea, n, strict=True)]
    assert min(ratios) - 1e-9 <= lo <= hi <= max(ratios) + 1e-9
