"""DynamicBucketingSampler: coverage, budget, exact resume, rank sharing, low padding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_code.sampler import DynamicBucketingSampler, equal_duration_boundaries, padding_share

durations_st = st.lists(st.floats(min_value=0.1, max_value=40.0, allow_nan=False), min_size=1, max_size=120)
common = settings(max_examples=40, deadline=None)


def _cost(d, batch, q=None):
    m = max(d[i] for i in batch)
    return len(batch) * (m if q is None else m + m * m / q)


@given(durations_st, st.floats(5.0, 100.0), st.integers(1, 8), st.integers(0, 5), st.booleans(),
       st.one_of(st.none(), st.floats(5.0, 60.0)), st.sampled_from([0, 4]), st.booleans())
@common
def test_each_utterance_once_and_budget_kept(durs, budget, nb, epoch, shuffle, quad, min_bpb, balance):
    s = DynamicBucketingSampler(durs, budget, nb, seed=3, shuffle=shuffle, quadratic_duration_s=quad,
                                min_batches_per_bucket=min_bpb, balance=balance, sort_pool_batches=2)
    s.set_epoch(epoch)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(durs)))
    assert len(batches) == len(s)
    for b in batches:
        assert b
        if len(b) > 1:  # a lone utterance longer than the budget may exceed it
            assert _cost(durs, b, quad) <= budget + 1e-9


@given(durations_st, st.integers(1, 6), st.lists(st.integers(1, 5), min_size=8, max_size=8))
@common
def test_bucket_batch_sizes_cap(durs, nb, caps):
    s = DynamicBucketingSampler(durs, 1000.0, nb, seed=0, min_batches_per_bucket=0)
    caps = caps[: s.num_duration_buckets] + [1] * max(0, s.num_duration_buckets - len(caps))
    s = DynamicBucketingSampler(durs, 1000.0, nb, seed=0, bucket_batch_sizes=caps, min_batches_per_bucket=0)
    bucket_of = np.searchsorted(s.boundaries, np.asarray(durs), side="right")
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(durs)))
    for b in batches:
        assert len(b) <= min(caps[bucket_of[i]] for i in b)


@given(durations_st, st.integers(1, 6), st.integers(0, 3), st.integers(1, 3), st.data())
@common
def test_exact_resume_from_any_point(durs, nb, epoch, world, data):
    rank = data.draw(st.integers(0, world - 1))
    kw = dict(seed=11, rank=rank, world_size=world)
    ref = DynamicBucketingSampler(durs, 30.0, nb, **kw)
    ref.set_epoch(epoch)
    full = list(ref)
    k = data.draw(st.integers(0, len(full)))
    s = DynamicBucketingSampler(durs, 30.0, nb, **kw)
    s.set_epoch(epoch)
    it = iter(s)
    head = [next(it) for _ in range(k)]
    state = s.state_dict()
    fresh = DynamicBucketingSampler(durs, 30.0, nb, **kw)
    fresh.load_state_dict(state)
    fresh.set_epoch(epoch)  # a training loop re-selecting the same epoch keeps the position
    assert head + list(fresh) == full
    assert list(fresh) == full  # the following iteration starts the epoch from the beginning


@given(durations_st, st.integers(1, 6), st.integers(1, 4), st.booleans(), st.integers(0, 3))
@common
def test_rank_shares_disjoint_covering_equal(durs, nb, world, drop_last, epoch):
    shares = []
    for r in range(world):
        s = DynamicBucketingSampler(durs, 25.0, nb, seed=5, rank=r, world_size=world, drop_last=drop_last)
        s.set_epoch(epoch)
        shares.append(list(s))
    assert len({len(sh) for sh in shares}) == 1  # equal number of batches per rank
    idx = [i for sh in shares for b in sh for i in b]
    if not drop_last:
        assert sorted(set(idx)) == list(range(len(durs)))  # covering
        extra = len(idx) - len(durs)
        # disjoint, except the documented fallback: when every batch is a single utterance and
        # their count is not a multiple of world_size, a few batches are repeated
        assert 0 <= extra < world
        if extra:
            assert all(len(b) == 1 for sh in shares for b in sh)
    else:
        assert len(idx) == len(set(idx))  # disjoint


@given(durations_st, st.integers(1, 5))
@common
def test_epochs_reshuffle_deterministically(durs, nb):
    a = DynamicBucketingSampler(durs, 20.0, nb, seed=1)
    b = DynamicBucketingSampler(durs, 20.0, nb, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)


def test_epochs_differ_and_2d_buckets():
    rng = np.random.default_rng(0)
    d = rng.uniform(1, 20, 500)
    toks = (d * rng.uniform(5, 20, 500)).astype(int)
    s = DynamicBucketingSampler(d, 60.0, 4, seed=0, token_lengths=toks, num_token_buckets=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    assert sorted(i for b in e1 for i in b) == list(range(500))
    # with 2D buckets the token-length spread inside a batch is smaller than with 1D buckets
    s1 = DynamicBucketingSampler(d, 60.0, 4, seed=0)

    def spread(batches):
        return np.mean([toks[b].max() - toks[b].min() for b in batches if len(b) > 1])

    assert spread(e0) < spread(list(s1))


def test_boundaries_equal_total_duration():
    rng = np.random.default_rng(1)
    d = np.exp(rng.normal(2.5, 0.5, 5000))
    bounds = equal_duration_boundaries(d, 10)
    assert len(bounds) == 9
    totals = np.bincount(np.searchsorted(bounds, d, side="right"), weights=d)
    assert totals.max() / totals.min() < 1.1


def test_padding_share_small_on_lognormal():
    """The design goal at a small scale: ≤ 2 % padding, batches nearly full."""
    rng = np.random.default_rng(0)
    d = np.clip(np.exp(np.log(12.0) + 0.5 * rng.standard_normal(5000)), 1, 35)
    s = DynamicBucketingSampler(d, 600.0, 30, seed=0)
    batches = list(s)
    assert padding_share(d, batches) < 0.02
    mean_bs = np.mean([len(b) for b in batches])
    assert mean_bs > 0.9 * 600.0 / d.mean()


@given(durations_st, st.floats(5.0, 100.0), st.integers(1, 8), st.integers(0, 3))
@common
def test_drop_last_drops_at_most_one_partial_batch(durs, budget, nb, epoch):
    keep = DynamicBucketingSampler(durs, budget, nb, seed=2, min_batches_per_bucket=0)
    drop = DynamicBucketingSampler(durs, budget, nb, seed=2, min_batches_per_bucket=0, drop_last=True)
    keep.set_epoch(epoch)
    drop.set_epoch(epoch)
    kept, dropped = list(keep), list(drop)
    idx = [i for b in dropped for i in b]
    assert len(idx) == len(set(idx))
    assert len(kept) - len(dropped) in (0, 1)
    assert set(idx) <= set(range(len(durs)))


@given(st.lists(st.floats(0.5, 30.0), min_size=2, max_size=150), st.floats(10.0, 120.0),
       st.integers(1, 4), st.integers(0, 2))
@common
def test_balancing_keeps_count_and_never_adds_padding(durs, budget, nb, epoch):
    greedy = DynamicBucketingSampler(durs, budget, nb, seed=4, balance=False, min_batches_per_bucket=0)
    balanced = DynamicBucketingSampler(durs, budget, nb, seed=4, balance=True, min_batches_per_bucket=0)
    greedy.set_epoch(epoch)
    balanced.set_epoch(epoch)
    g, b = list(greedy), list(balanced)
    assert len(g) == len(b)
    d = np.asarray(durs)
    padded = lambda bs: sum(len(x) * d[x].max() for x in bs)  # noqa: E731
    assert padded(b) <= padded(g) + 1e-6


def test_set_bucket_batch_sizes_from_bucket_max_durations():
    rng = np.random.default_rng(3)
    d = rng.uniform(1, 20, 400)
    s = DynamicBucketingSampler(d, 100.0, 30, seed=0)
    maxes = s.bucket_max_durations()
    assert len(maxes) == s.num_duration_buckets < 30  # small data: fewer buckets than asked
    assert maxes == sorted(maxes) and abs(maxes[-1] - d.max()) < 1e-12
    with pytest.raises(ValueError, match="exactly"):
        s.set_bucket_batch_sizes([4] * 30)
    sizes = [max(1, int(60 / m)) for m in maxes]  # e.g. what a memory probe returns
    s.set_bucket_batch_sizes(sizes)
    bucket_of = np.searchsorted(s.boundaries, d, side="right")
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert all(len(b) <= min(sizes[bucket_of[i]] for i in b) for b in batches)


# -- replay (warm-started training: all new utterances + a share of old ones each epoch) ---------


@given(durations_st, st.data(), st.floats(0.0, 0.9), st.integers(1, 3), st.integers(0, 4), st.integers(1, 3))
@common
def test_replay_puts_every_new_utterance_in_each_epoch_and_the_share_of_old(durs, data, share, repeats, epoch, world):
    new = data.draw(st.lists(st.booleans(), min_size=len(durs), max_size=len(durs)))
    n_new, n_old = sum(new), len(new) - sum(new)
    want_old = min(round(share / (1 - share) * n_new * repeats), n_old)
    got: list[int] = []
    for rank in range(world):  # the ranks together hold the epoch
        s = DynamicBucketingSampler(durs, 30.0, 4, seed=5, rank=rank, world_size=world, new_mask=new,
                                    replay_share=share, new_repeats=repeats)
        s.set_epoch(epoch)
        got += [i for b in s for i in b]
    counts = np.bincount(got, minlength=len(durs))
    if world > 1:
        # equal batch counts per rank may repeat a batch when too few can be split: coverage only
        exp = [1] * len(durs) if n_new == 0 else [repeats if x else 0 for x in new]
        assert all(c >= e for c, e in zip(counts, exp, strict=True))
        return
    if n_new == 0:
        assert counts.tolist() == [1] * len(durs)  # nothing new: a plain epoch
        return
    assert all(counts[i] == repeats for i in range(len(durs)) if new[i])
    olds = [int(counts[i]) for i in range(len(durs)) if not new[i]]
    assert set(olds) <= {0, 1}
    assert sum(olds) == want_old


def test_replay_draws_other_old_utterances_each_epoch_and_resumes_exactly():
    rng = np.random.default_rng(0)
    durs = rng.uniform(0.5, 6.0, 300).tolist()
    new = [i >= 240 for i in range(300)]  # 60 new, 240 old
    kw = dict(seed=9, new_mask=new, replay_share=0.5)
    s = DynamicBucketingSampler(durs, 20.0, 6, **kw)
    old_sets = []
    for e in range(3):
        s.set_epoch(e)
        flat = [i for b in s for i in b]
        old_sets.append({i for i in flat if i < 240})
        assert len(old_sets[-1]) == 60 and set(range(240, 300)) <= set(flat)
    assert old_sets[0] != old_sets[1] != old_sets[2]  # the old sample changes with the epoch
    # exact resume mid-epoch, replay included
    s.set_epoch(1)
    full = list(s)
    r = DynamicBucketingSampler(durs, 20.0, 6, **kw)
    r.set_epoch(1)
    it = iter(r)
    head = [next(it) for _ in range(5)]
    state = r.state_dict()
    r2 = DynamicBucketingSampler(durs, 20.0, 6, **kw)
    r2.load_state_dict(state)
    assert head + list(r2) == full


def test_replay_arguments_are_checked():
    with pytest.raises(ValueError, match="replay_share"):
        DynamicBucketingSampler([1.0, 2.0], 10.0, 1, new_mask=[True, False], replay_share=1.0)
    with pytest.raises(ValueError, match="new_mask"):
        DynamicBucketingSampler([1.0, 2.0], 10.0, 1, new_mask=[True])


@given(durations_st, st.floats(5.0, 60.0), st.integers(1, 6), st.integers(0, 4), st.integers(1, 3), st.data())
@common
def test_speed_variants_batch_by_the_chosen_copy_and_resume_exactly(durs, budget, nb, epoch, world, data):
    """With (N, V) copy durations (plain, 0.9x, 1.1x speed), each epoch batches every utterance once
    with the duration of the copy ``epoch_variants`` picks (a pure hash of seed, epoch, index: the
    dataset loads that copy), keeps the budget in those durations, and resumes exactly."""
    from model_code.augment import variant_choice

    d = np.asarray(durs)
    vd = np.stack([d, d / 0.9, d / 1.1], axis=1)  # (N, 3)
    rank = data.draw(st.integers(0, world - 1))
    kw = dict(seed=5, rank=rank, world_size=world, variant_durations=vd)
    s = DynamicBucketingSampler(durs, budget, nb, **kw)
    s.set_epoch(epoch)
    v = s.epoch_variants(epoch)
    np.testing.assert_array_equal(v, variant_choice(5, epoch, np.arange(len(durs)), 3))
    chosen = vd[np.arange(len(durs)), v]
    np.testing.assert_array_equal(s.epoch_durations(epoch), chosen)
    full = list(s)
    for b in full:
        if len(b) > 1:
            assert _cost(chosen, b) <= budget + 1e-9  # the budget holds for what is loaded
    if world == 1:
        assert sorted(i for b in full for i in b) == list(range(len(durs)))
    assert max(s.bucket_max_durations()) == pytest.approx(float((d / 0.9).max()))  # the longest copy
    k = data.draw(st.integers(0, len(full)))
    r = DynamicBucketingSampler(durs, budget, nb, **kw)
    r.set_epoch(epoch)
    it = iter(r)
    head = [next(it) for _ in range(k)]
    fresh = DynamicBucketingSampler(durs, budget, nb, **kw)
    fresh.load_state_dict(r.state_dict())
    fresh.set_epoch(epoch)
    assert head + list(fresh) == full


def test_speed_variants_change_batches_between_epochs_and_report_the_longest_copy():
    rng = np.random.default_rng(1)
    d = rng.uniform(0.5, 8.0, 400)
    vd = np.stack([d, d / 0.9, d / 1.1], axis=1)
    s = DynamicBucketingSampler(d, 30.0, 6, seed=2, variant_durations=vd)
    plain = DynamicBucketingSampler(d, 30.0, 6, seed=2)
    assert s.boundaries.tolist() == plain.boundaries.tolist()  # buckets from the plain durations
    assert s.bucket_max_durations() == pytest.approx([m / 0.9 for m in plain.bucket_max_durations()])
    assert np.mean(s.epoch_variants(0) != s.epoch_variants(1)) > 0.5
    s.set_epoch(0)
    b0 = list(s)
    assert b0 != [list(b) for b in plain]  # batches are filled by the chosen copies' durations
    assert s.padding_share() < 0.1
    with pytest.raises(ValueError, match="variant_durations"):
        DynamicBucketingSampler(d, 30.0, 6, variant_durations=vd[:10])
