"""Duration-bucketing batch sampler that spends (almost) no compute on padding.

A CTC model runs on padded tensors: a batch costs ``batch_size × longest utterance``, so mixing
a 3 s and a 30 s utterance wastes 27 s of compute (arXiv 2503.05931 measures > 50 % padding for
careless sampling). This sampler

1. **estimates bucket boundaries** from the durations so each bucket holds the same *total*
   duration (``num_buckets`` buckets; optionally each split again by token length into
   ``num_token_buckets`` — 2D buckets — with the same equal-duration rule);
2. each epoch, **shuffles each bucket** with an RNG seeded by ``(seed, epoch)`` and cuts it into
   *pools* of about ``sort_pool_batches`` batches' worth of audio; each pool is **sorted by
   duration** and batches are **filled greedily** from sorted neighbours while the *padded* cost
   ``n × max_d`` (plus Lhotse's quadratic term ``n × max_d² / quadratic_duration_s``) stays within
   ``max_duration_s`` (and ``n ≤ bucket_batch_sizes[bucket]`` if given, e.g. from
   :mod:`model_code.memory_probe`). The unfinished batch at the end of a pool is carried into the
   next pool, so only the last batch of a bucket may be partly filled;
3. **shuffles the order of all batches** (same RNG);
4. **shares batches between ranks**: every rank computes the same global list and takes
   ``batches[rank::world_size]``. For equal counts per rank the list is made a multiple of
   ``world_size`` — by splitting the largest batches in two (``drop_last=False``: every utterance
   still appears exactly once per epoch) or by dropping the last batches (``drop_last=True``,
   which also drops each bucket's partly filled last batch).

An utterance whose cost alone exceeds the budget gets a batch of its own (it is never dropped).

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
        bucket_batch_sizes: optional max batch size per duration bucket (``num_buckets`` ints,
            after boundary de-duplication: see :attr:`num_duration_buckets`).
        sort_pool_batches: how many batches' worth of audio is sorted together (randomness vs.
            padding; larger → less padding, less variety between epochs).
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
        n = len(self.durations)

        # --- bucket assignment (fixed for the dataset) ---
        self.boundaries = equal_duration_boundaries(self.durations, self.num_buckets)
        dur_bucket = np.searchsorted(self.boundaries, self.durations, side="right")
        self.num_duration_buckets = len(self.boundaries) + 1
        if bucket_batch_sizes is not None:
            bbs = [int(x) for x in bucket_batch_sizes]
            if len(bbs) < self.num_duration_buckets or min(bbs) < 1:
                raise ValueError(
                    f"bucket_batch_sizes needs {self.num_duration_buckets} positive ints, got {bbs}"
                )
            self.bucket_batch_sizes: list[int] | None = bbs
        else:
            self.bucket_batch_sizes = None
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

        self.epoch = 0
        self._yielded = 0
        self._restored = False
        self._cache: tuple[int, list[list[int]]] | None = None

    # ------------------------------------------------------------------ cost
    def cost(self, max_d: float, n: int) -> float:
        """Padded cost of a batch of ``n`` utterances whose longest lasts ``max_d`` seconds."""
        per = max_d if self.quadratic_duration_s is None else max_d + max_d * max_d / self.quadratic_duration_s
        return n * per

    # ------------------------------------------------------------------ batches
    def _bucket_batches(self, members: np.ndarray, cap: int | None, rng: np.random.Generator | None
                        ) -> tuple[list[list[int]], bool]:
        """Greedy batches for one bucket → (batches, whether the last one is partly filled)."""
        d = self.durations
        if rng is None:
            order = members[np.argsort(d[members], kind="stable")]
            pools = [order]
        else:
            order = members[rng.permutation(len(members))]
            mean_d = float(d[members].mean()) if len(members) else 1.0
            per_batch = max(int(self.max_duration_s // max(self.cost(mean_d, 1), 1e-9)), 1)
            if cap is not None:
                per_batch = min(per_batch, cap)
            pool_size = max(per_batch * self.sort_pool_batches, 1)
            pools = [order[i : i + pool_size] for i in range(0, len(order), pool_size)]
        batches: list[list[int]] = []
        carry: list[int] = []
        for pool in pools:
            items = np.concatenate([np.asarray(carry, dtype=np.int64), pool]) if carry else pool
            items = items[np.argsort(d[items], kind="stable")]
            cur: list[int] = []
            cur_max = 0.0
            for i in items.tolist():
                di = d[i]
                m = max(cur_max, di)
                if cur and (self.cost(m, len(cur) + 1) > self.max_duration_s or (cap is not None and len(cur) >= cap)):
                    batches.append(cur)
                    cur, m = [], di
                cur.append(i)
                cur_max = m
            carry = cur
        partial = False
        if carry:
            full = self.cost(max(d[carry]), len(carry) + 1) > self.max_duration_s or (
                cap is not None and len(carry) >= cap
            )
            batches.append(carry)
            partial = not full
        return batches, partial

    def _global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches for ``epoch``, in order (depends only on seed, epoch and data)."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        batches: list[list[int]] = []
        for b, members in self._buckets:
            cap = self.bucket_batch_sizes[b] if self.bucket_batch_sizes is not None else None
            bb, partial = self._bucket_batches(members, cap, rng)
            if self.drop_last and partial:
                bb = bb[:-1]
            batches.extend(bb)
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
        """1 − Σ duration / Σ (batch size × longest) over ``batches`` (default: this rank's epoch)."""
        return padding_share(self.durations, self._epoch_batches() if batches is None else batches)


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
