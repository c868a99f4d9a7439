"""Duration-bucketing batch sampler that spends (almost) no compute on padding.

A CTC model runs on padded tensors: a batch costs ``batch_size × longest utterance``, so mixing
a 3 s and a 30 s utterance wastes 27 s of compute (arXiv 2503.05931 measures > 50 % padding for
careless sampling). This sampler

1. **estimates bucket boundaries** from the durations so each bucket holds the same *total*
   duration (``num_buckets`` buckets; optionally each split again by token length into
   ``num_token_buckets`` — 2D buckets — with the same equal-duration rule). A small dataset gets
   fewer buckets: at most one per ``min_batches_per_bucket`` batches' worth of audio, because a
   bucket smaller than a batch only produces small, partly filled batches;
2. each epoch, **shuffles each bucket** with an RNG seeded by ``(seed, epoch)`` and cuts it into
   *pools* of about ``sort_pool_batches`` batches' worth of audio; each pool is **sorted by
   duration** and batches are **filled greedily** from sorted neighbours while the *padded* cost
   ``n × max_d`` (plus Lhotse's quadratic term ``n × max_d² / quadratic_duration_s``) stays within
   ``max_duration_s`` (and ``n ≤ bucket_batch_sizes[bucket]`` if given, e.g. from
   :mod:`model_code.memory_probe`). The unfinished batch at the end of a pool is carried into the
   next pool; each bucket's final unfinished batch goes to a common leftover pool, which is
   sorted and batched the same way (neighbouring buckets' leftovers have similar durations), so
   at most one batch per epoch is partly filled. Then (``balance=True``)
   the cut points between those greedy batches are moved by a small dynamic program that keeps
   the *same number* of batches (so the same mean batch size) and the budget, and minimizes
   the total padded cost — greedy filling from the shortest up packs the early batches full and
   leaves wide duration ranges for later ones, which matters when a bucket holds few batches
   (skipped for pools whose greedy padding is already under 0.5 %);
3. **shuffles the order of all batches** (same RNG);
4. **shares batches between ranks**: every rank computes the same global list and takes
   ``batches[rank::world_size]``. For equal counts per rank the list is made a multiple of
   ``world_size`` — by splitting the largest batches in two (``drop_last=False``: every utterance
   still appears exactly once per epoch) or by dropping the last batches (``drop_last=True``,
   which also drops the partly filled last batch of the leftover pool).

An utterance whose cost alone exceeds the budget gets a batch of its own (it is never dropped).

**Replay** (continual training from a parent model): with ``new_mask`` (N,) bool, an epoch does
not hold every utterance once but *every new utterance* (``new_repeats`` times) plus a sample of
the old ones drawn without replacement with an RNG seeded by ``(seed, epoch)``, so that old ones
make up ``replay_share`` of the epoch's utterances (all old ones at most). The model keeps
seeing what it learned before (no forgetting) without spending most of a short budget on data it
already knows (no overfitting to the newest week either: it is always mixed). Batches are then
built from that multiset exactly as above, so the epoch's list still depends only on (seed,
epoch, data) and resuming stays exact.

**Variants** (speed perturbation): with ``variant_durations`` (N, V), utterance ``i`` exists in V
cached copies of different lengths (plain, 0.9x and 1.1x speed: a 0.9 copy lasts ``d / 0.9``).
Each epoch uses copy ``epoch_variants(epoch)[i]`` (:func:`model_code.augment.variant_choice`, a
pure hash of ``(seed, epoch, i)``; the training dataset loads the same copy), and batches are
filled and budgeted with *that copy's* duration, so a batch never holds more audio than
``max_duration_s`` of what is actually loaded. Bucket membership stays fixed, from the plain
``durations`` (a copy's length is within ±11 % of it, so neighbours stay neighbours);
:meth:`bucket_max_durations` reports the longest copy (what the memory probe must fit).

Resuming: ``state_dict()`` = ``{epoch, batches already yielded on this rank, ...}``. After
``load_state_dict`` the next ``iter()`` regenerates the same epoch's list (it depends only on the
seed, the epoch and the data) and skips what was already yielded, so the rest of the epoch is
exactly what an uninterrupted run would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def equal_duration_boundaries(durations: np.ndarray, num_buckets: int) -> np.ndarray:
    """Upper boundaries (num_buckets-1,) splitting ``durations`` into buckets of equal total duration.

    Bucket ``b`` holds durations ``d`` with ``bounds[b-1] <= d < bounds[b]`` (``np.searchsorted(...,
    side="right")``). Duplicate boundaries collapse, so there may be fewer real buckets.
    """
    d = np.sort(np.asarray(durations, dtype=np.float64))
    if num_buckets <= 1 or len(d) == 0:
        return np.zeros(0)
    cum = np.cumsum(d)
    targets = cum[-1] * np.arange(1, num_buckets) / num_buckets
    idx = np.searchsorted(cum, targets, side="left")
    idx = np.clip(idx, 0, len(d) - 1)
    return np.unique(d[idx])


class DynamicBucketingSampler:
    """Batch sampler: iterates lists of dataset indices (see the module docstring).

    Args:
        durations: (N,) utterance durations in seconds.
        max_duration_s: padded-cost budget per batch (per rank).
        num_buckets: number of duration buckets (equal total duration each).
        seed, shuffle: RNG seed; with ``shuffle=False`` batches come from fully sorted buckets
            in bucket order (deterministic, epoch-independent).
        rank, world_size: this process's share of the global batch list.
        quadratic_duration_s: if set, each utterance costs ``d + d²/quadratic_duration_s``.
        token_lengths: (N,) target lengths for 2D buckets; ``num_token_buckets`` splits per
            duration bucket.
        drop_last: drop each bucket's partly filled last batch and the global remainder.
        bucket_batch_sizes: optional max batch size per duration bucket: exactly
            :attr:`num_duration_buckets` ints (see :meth:`set_bucket_batch_sizes`).
        new_mask: (N,) bool, which utterances are new (replay mode; ``None``: every utterance
            once per epoch).
        replay_share: in replay mode, the share of old utterances in an epoch, in [0, 1).
        new_repeats: in replay mode, how many times each new utterance appears per epoch.
        variant_durations: optional (N, V) durations of V copies of each utterance (column 0:
            usually ``durations`` itself); each epoch batches one copy per utterance (see above).
        sort_pool_batches: how many batches' worth of audio is sorted together (randomness vs.
            padding; larger → less padding, less variety between epochs).
        min_batches_per_bucket: fewer buckets than ``num_buckets`` when the data holds less than
            this many full batches per bucket (0 = always ``num_buckets``).
        balance: re-split each pool's greedy batches for minimum padded cost (same count).
    """

    def __init__(
        self,
        durations: Sequence[float] | np.ndarray,
        max_duration_s: float,
        num_buckets: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        quadratic_duration_s: float | None = None,
        token_lengths: Sequence[int] | np.ndarray | None = None,
        num_token_buckets: int = 1,
        drop_last: bool = False,
        bucket_batch_sizes: Sequence[int] | None = None,
        sort_pool_batches: int = 16,
        min_batches_per_bucket: int = 4,
        balance: bool = True,
        new_mask: Sequence[bool] | np.ndarray | None = None,
        replay_share: float = 0.0,
        new_repeats: int = 1,
        variant_durations: Sequence[Sequence[float]] | np.ndarray | None = None,
    ) -> None:
        self.durations = np.asarray(durations, dtype=np.float64)
        if self.durations.ndim != 1:
            raise ValueError("durations must be 1-D")
        if np.any(~np.isfinite(self.durations)) or np.any(self.durations < 0):
            raise ValueError("durations must be finite and >= 0")
        if max_duration_s <= 0:
            raise ValueError("max_duration_s must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if quadratic_duration_s is not None and quadratic_duration_s <= 0:
            raise ValueError("quadratic_duration_s must be > 0")
        self.max_duration_s = float(max_duration_s)
        self.num_buckets = int(num_buckets)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.quadratic_duration_s = quadratic_duration_s
        self.drop_last = bool(drop_last)
        self.sort_pool_batches = max(int(sort_pool_batches), 1)
        self.balance = bool(balance)
        n = len(self.durations)

        # --- bucket assignment (fixed for the dataset) ---
        nb = self.num_buckets
        if min_batches_per_bucket > 0 and n:
            d = self.durations
            total = float(d.sum() if quadratic_duration_s is None else (d + d * d / quadratic_duration_s).sum())
            nb = int(min(nb, max(1, total // (self.max_duration_s * min_batches_per_bucket))))
        self.boundaries = equal_duration_boundaries(self.durations, nb)
        dur_bucket = np.searchsorted(self.boundaries, self.durations, side="right")
        self.num_duration_buckets = len(self.boundaries) + 1
        self._dur_bucket = dur_bucket
        self.bucket_batch_sizes: list[int] | None = None
        self.set_bucket_batch_sizes(bucket_batch_sizes)
        self.token_lengths = None
        sub = np.zeros(n, dtype=np.int64)
        self.num_token_buckets = max(int(num_token_buckets), 1)
        if token_lengths is not None:
            self.token_lengths = np.asarray(token_lengths, dtype=np.int64)
            if self.token_lengths.shape != self.durations.shape:
                raise ValueError("token_lengths must have the same length as durations")
            if self.num_token_buckets > 1:
                for b in range(self.num_duration_buckets):
                    members = np.nonzero(dur_bucket == b)[0]
                    if len(members) == 0:
                        continue
                    tl = self.token_lengths[members].astype(np.float64)
                    bounds = _weighted_boundaries(tl, self.durations[members], self.num_token_buckets)
                    sub[members] = np.searchsorted(bounds, tl, side="right")
        # list of (duration bucket id, member indices sorted ascending by index)
        self._buckets: list[tuple[int, np.ndarray]] = []
        for b in range(self.num_duration_buckets):
            in_b = dur_bucket == b
            for s in np.unique(sub[in_b]):
                members = np.nonzero(in_b & (sub == s))[0]
                if len(members):
                    self._buckets.append((b, members))

        self.new_mask: np.ndarray | None = None
        if new_mask is not None:
            self.new_mask = np.asarray(new_mask, dtype=bool)
            if self.new_mask.shape != self.durations.shape:
                raise ValueError("new_mask must have the same length as durations")
        if not 0.0 <= float(replay_share) < 1.0:
            raise ValueError("replay_share must be in [0, 1)")
        if int(new_repeats) < 1:
            raise ValueError("new_repeats must be >= 1")
        self.replay_share = float(replay_share)
        self.new_repeats = int(new_repeats)
        self.variant_durations: np.ndarray | None = None
        if variant_durations is not None:
            vd = np.asarray(variant_durations, dtype=np.float64)
            if vd.ndim != 2 or vd.shape[0] != n or vd.shape[1] < 1:
                raise ValueError(f"variant_durations must be (N={n}, V>=1), got shape {vd.shape}")
            if np.any(~np.isfinite(vd)) or np.any(vd < 0):
                raise ValueError("variant_durations must be finite and >= 0")
            self.variant_durations = vd

        self.epoch = 0
        self._yielded = 0
        self._restored = False
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_bucket_batch_sizes(self, sizes: Sequence[int] | None) -> None:
        """Cap the batch size per duration bucket (``None`` = no cap), e.g. with
        ``memory_probe.probe_batch_sizes(..., sampler.bucket_max_durations(), ...)``.

        Needs exactly :attr:`num_duration_buckets` positive ints (that count can be below
        ``num_buckets`` for small datasets: probe ``bucket_max_durations()``, not your own bins).
        """
        n = len(self.durations)
        if sizes is None:
            self.bucket_batch_sizes = None
            self._item_cap = np.full(n, np.iinfo(np.int64).max // 4, dtype=np.int64)
        else:
            bbs = [int(x) for x in sizes]
            if len(bbs) != self.num_duration_buckets or min(bbs) < 1:
                raise ValueError(
                    f"bucket_batch_sizes needs exactly {self.num_duration_buckets} positive ints "
                    f"(one per entry of bucket_max_durations()), got {bbs}"
                )
            self.bucket_batch_sizes = bbs
            self._item_cap = np.asarray(bbs, dtype=np.int64)[self._dur_bucket]
        self._cache = None

    def bucket_max_durations(self) -> list[float]:
        """Longest duration in each duration bucket (what :mod:`memory_probe` should probe); with
        variants, the longest copy."""
        b = np.searchsorted(self.boundaries, self.durations, side="right")
        longest = self.durations if self.variant_durations is None else self.variant_durations.max(axis=1)
        return [float(longest[b == k].max()) if np.any(b == k) else 0.0
                for k in range(self.num_duration_buckets)]

    def epoch_variants(self, epoch: int) -> np.ndarray:
        """(N,) which copy of each utterance ``epoch`` uses (all 0 without ``variant_durations``)."""
        from model_code.augment import variant_choice

        n_var = 1 if self.variant_durations is None else self.variant_durations.shape[1]
        return variant_choice(self.seed, epoch, np.arange(len(self.durations)), n_var)

    def epoch_durations(self, epoch: int) -> np.ndarray:
        """(N,) the duration of the copy each utterance has in ``epoch`` (what batches are filled by)."""
        if self.variant_durations is None:
            return self.durations
        return self.variant_durations[np.arange(len(self.durations)), self.epoch_variants(epoch)]

    # ------------------------------------------------------------------ cost
    def cost(self, max_d: float, n: int) -> float:
        """Padded cost of a batch of ``n`` utterances whose longest lasts ``max_d`` seconds."""
        per = max_d if self.quadratic_duration_s is None else max_d + max_d * max_d / self.quadratic_duration_s
        return n * per

    def _unit_costs(self, d: np.ndarray) -> np.ndarray:
        """Per-utterance padded cost of a batch whose longest utterance is ``d`` (vectorized)."""
        return d if self.quadratic_duration_s is None else d + d * d / self.quadratic_duration_s

    # ------------------------------------------------------------------ batches
    def _fill(self, items: np.ndarray, d: np.ndarray) -> tuple[list[list[int]], list[int]]:
        """Greedy batches from ``items`` sorted ascending by duration → (full batches, leftover).

        A batch is closed when the next utterance would break the budget or the batch-size cap
        (the smallest cap among its utterances' buckets); the unfinished last one is returned
        separately so the caller can carry it on. ``d``: (N,) this epoch's durations.
        """
        caps = self._item_cap
        batches: list[list[int]] = []
        cur: list[int] = []
        cur_max, cur_cap = 0.0, 0
        for i in items.tolist():
            m = max(cur_max, d[i])
            c = min(cur_cap, caps[i]) if cur else caps[i]
            if cur and (self.cost(m, len(cur) + 1) > self.max_duration_s or len(cur) + 1 > c):
                batches.append(cur)
                cur, m, c = [], d[i], caps[i]
            cur.append(i)
            cur_max, cur_cap = m, c
        return batches, cur

    def _is_full(self, batch: list[int], d: np.ndarray) -> bool:
        """Would one more utterance as long as the longest break the budget or the cap?"""
        return (self.cost(float(d[batch].max()), len(batch) + 1) > self.max_duration_s
                or len(batch) + 1 > int(self._item_cap[batch].min()))

    def _balance(self, batches: list[list[int]], d: np.ndarray) -> list[list[int]]:
        """Same number of batches over the same sorted utterances, minimum padded cost."""
        if not self.balance or len(batches) < 2 or _padding(d, batches) <= 0.005:
            return batches
        flat = [i for b in batches for i in b]
        caps = np.minimum.accumulate(self._item_cap[flat])  # conservative: prefix minimum
        sizes = _min_padding_split(self._unit_costs(d[flat]), len(batches), self.max_duration_s, caps)
        if sizes is None:
            return batches
        bounds = np.cumsum([0, *sizes])
        return [flat[bounds[k] : bounds[k + 1]] for k in range(len(sizes))]

    def _bucket_batches(self, members: np.ndarray, rng: np.random.Generator | None, d: np.ndarray
                        ) -> tuple[list[list[int]], list[int]]:
        """Full batches of one bucket (greedy fill, then balanced) and its leftover utterances."""
        if rng is None:
            pools = [members]
        else:
            order = members[rng.permutation(len(members))]
            mean_d = float(d[members].mean()) if len(members) else 1.0
            per_batch = max(int(self.max_duration_s // max(self.cost(mean_d, 1), 1e-9)), 1)
            per_batch = min(per_batch, int(self._item_cap[members].min()))
            pool_size = max(per_batch * self.sort_pool_batches, 1)
            pools = [order[i : i + pool_size] for i in range(0, len(order), pool_size)]
        batches: list[list[int]] = []
        carry: list[int] = []
        for pool in pools:
            items = np.concatenate([np.asarray(carry, dtype=np.int64), pool]) if carry else pool
            items = items[np.argsort(d[items], kind="stable")]
            full, carry = self._fill(items, d)
            batches.extend(self._balance(full, d))
        return batches, carry

    def epoch_counts(self, epoch: int) -> np.ndarray:
        """(N,) how many times each utterance appears in ``epoch`` (all ones without replay)."""
        n = len(self.durations)
        if self.new_mask is None:
            return np.ones(n, dtype=np.int64)
        counts = np.where(self.new_mask, self.new_repeats, 0).astype(np.int64)
        old = np.nonzero(~self.new_mask)[0]
        n_new = int(self.new_mask.sum()) * self.new_repeats
        if n_new == 0:  # nothing new: the whole set once (a plain epoch)
            return np.ones(n, dtype=np.int64)
        want = int(round(self.replay_share / (1.0 - self.replay_share) * n_new))
        k = min(want, len(old))
        if k:
            rng = np.random.default_rng([self.seed, epoch, 0x5E])  # its own stream: batching RNG untouched
            counts[rng.choice(old, size=k, replace=False)] = 1
        return counts

    def _global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches for ``epoch``, in order (depends only on seed, epoch and data)."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        counts = self.epoch_counts(epoch) if self.new_mask is not None else None
        d = self.epoch_durations(epoch)
        batches: list[list[int]] = []
        leftovers: list[int] = []
        for _, members in self._buckets:
            if counts is not None:
                members = np.repeat(members, counts[members])
                if not len(members):
                    continue
            full, rest = self._bucket_batches(members, rng, d)
            batches.extend(full)
            leftovers.extend(rest)
        if leftovers:
            # each bucket's unfinished batch: pooled across (neighbouring) buckets and re-batched
            items = np.asarray(leftovers, dtype=np.int64)
            items = items[np.argsort(d[items], kind="stable")]
            full, rest = self._fill(items, d)
            if rest and (not self.drop_last or self._is_full(rest, d)):
                full.append(rest)
            batches.extend(self._balance(full, d))
        if rng is not None and batches:
            perm = rng.permutation(len(batches))
            batches = [batches[i] for i in perm]
        w = self.world_size
        if w > 1 and len(batches) % w:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % w]
            else:
                batches = _split_to_multiple(batches, w)
        return batches

    def _epoch_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._global_batches(self.epoch)[self.rank :: self.world_size])
        return self._cache[1]

    # ------------------------------------------------------------------ protocol
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles). Re-selecting the current epoch keeps a restored position."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._yielded = 0
            self._restored = False

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        start = self._yielded if self._restored else 0
        self._restored = False
        self._yielded = start
        for i in range(start, len(batches)):
            self._yielded = i + 1
            yield list(batches[i])

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_utterances": int(len(self.durations)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; the next ``iter()`` continues exactly after the last yielded batch."""
        if int(state.get("num_utterances", len(self.durations))) != len(self.durations):
            raise ValueError("sampler state is for a different dataset (utterance count differs)")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError("sampler state was saved with a different world_size")
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self._yielded = int(state["batches_yielded"])
        self._restored = True
        self._cache = None

    # ------------------------------------------------------------------ stats
    def padding_share(self, batches: list[list[int]] | None = None) -> float:
        """1 − Σ duration / Σ (batch size × longest) over ``batches`` (default: this rank's epoch),
        with this epoch's durations (the chosen copies)."""
        d = self.epoch_durations(self.epoch)
        return padding_share(d, self._epoch_batches() if batches is None else batches)


def padding_share(durations: np.ndarray, batches: list[list[int]]) -> float:
    """1 − Σ duration / Σ (batch size × longest duration in the batch)."""
    d = np.asarray(durations, dtype=np.float64)
    real = sum(float(d[b].sum()) for b in batches if b)
    padded = sum(len(b) * float(d[b].max()) for b in batches if b)
    return 0.0 if padded <= 0 else 1.0 - real / padded


def _weighted_boundaries(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Boundaries splitting ``values`` into ``k`` groups of equal total ``weights``."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    if len(v) == 0 or cum[-1] <= 0:
        return np.zeros(0)
    idx = np.clip(np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="left"), 0, len(v) - 1)
    return np.unique(v[idx])


def _padding(d: np.ndarray, batches: list[list[int]]) -> float:
    padded = sum(len(b) * float(d[b].max()) for b in batches)
    return 0.0 if padded <= 0 else 1.0 - sum(float(d[b].sum()) for b in batches) / padded


def _min_padding_split(unit: np.ndarray, k: int, budget: float, caps: np.ndarray | None) -> list[int] | None:
    """Sizes of ``k`` contiguous groups of the ascending ``unit`` costs minimizing Σ size × max.

    ``unit`` (M,) sorted ascending: a group ending at item i with m items costs ``m · unit[i]``
    and must satisfy ``m · unit[i] <= budget`` (or m == 1) and ``m <= caps[i]``. Dynamic program over
    (groups used, items covered), vectorized over items; O(k · max_group · M). Returns None when
    no split into exactly ``k`` groups exists (never for the greedy count, which is feasible).
    """
    n = len(unit)
    lim = np.maximum(np.floor(budget / np.maximum(unit, 1e-12) + 1e-9).astype(np.int64), 1)
    if caps is not None:
        lim = np.minimum(lim, np.maximum(caps, 1))
    max_m = int(min(lim.max(), n))
    inf = np.inf
    prev = np.full(n + 1, inf)
    prev[0] = 0.0
    choice = np.zeros((k, n + 1), dtype=np.int32)
    for g in range(k):
        cur = np.full(n + 1, inf)
        arg = np.zeros(n + 1, dtype=np.int32)
        for m in range(1, max_m + 1):
            # group of m items ending at item i-1 (prefix length i), i = m..n
            cand = prev[: n + 1 - m] + m * unit[m - 1 :]
            cand = np.where(lim[m - 1 :] >= m, cand, inf)
            better = cand < cur[m:]
            cur[m:] = np.where(better, cand, cur[m:])
            arg[m:] = np.where(better, m, arg[m:])
        prev = cur
        choice[g] = arg
    if not np.isfinite(prev[n]):
        return None
    sizes = []
    i = n
    for g in range(k - 1, -1, -1):
        m = int(choice[g, i])
        sizes.append(m)
        i -= m
    return sizes[::-1] if i == 0 else None


def _split_to_multiple(batches: list[list[int]], w: int) -> list[list[int]]:
    """Split the largest batches in two until the count is a multiple of ``w`` (keeps every index).

    Halves take the place of the batch they came from (second half appended after it), so the
    order stays a deterministic function of the input. If there are fewer indices than needed
    (too few utterances for ``w`` ranks), whole batches are repeated from the start.
    """
    batches = [list(b) for b in batches]
    need = (-len(batches)) % w
    while need:
        sizes = [len(b) for b in batches]
        j = int(np.argmax(sizes))
        if sizes[j] < 2:
            break
        b = batches[j]
        half = len(b) // 2
        batches[j : j + 1] = [b[:half], b[half:]]
        need -= 1
    k = 0
    while need and batches:
        batches.append(list(batches[k % len(batches)]))
        k += 1
        need -= 1
    return batches
