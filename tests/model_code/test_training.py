"""The DeepSpeed training loop on CPU: config generation, LR schedule, a real tiny training run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from model_code.packaging import load_model_dir
from model_code.training import (
    TrainArgs,
    build_ds_config,
    lr_lambda_factory,
    params_digest,
    resolve_precision,
    train,
)
from tests.model_code.train_helpers import tiny_args


def test_ds_config_is_generated_from_the_typed_arguments(tmp_path):
    a = tiny_args(tmp_path, grad_accum=3, grad_clip=2.5, zero_stage=2, precision="auto", lr=1e-3)
    cpu = build_ds_config(a, "cpu")
    assert cpu["gradient_accumulation_steps"] == 3
    assert cpu["gradient_clipping"] == 2.5
    assert cpu["zero_optimization"] == {"stage": 2}
    assert cpu["optimizer"]["type"] == "AdamW" and cpu["optimizer"]["params"]["lr"] == 1e-3
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # no JIT-compiled CPU Adam
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]  # fp32 weights on a CPU
    gpu = build_ds_config(a, "cuda")
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["params"]["torch_adam"] is False
    assert resolve_precision("fp16", "cuda") == "fp16" and resolve_precision("auto", "cuda") == "bf16"
    # bf16 (or auto) on a CPU: autocast with fp32 weights where the CPU has native bf16, else fp32
    assert resolve_precision("auto", "cpu", native_bf16=True) == "bf16-autocast"
    assert resolve_precision("auto", "cpu", native_bf16=False) == "fp32"
    assert resolve_precision("bf16", "cpu", native_bf16=True) == "bf16-autocast"
    assert resolve_precision("bf16", "cpu", native_bf16=False) == "fp32"
    assert resolve_precision("fp16", "cpu", native_bf16=True) == "fp32"
    assert not build_ds_config(dataclasses.replace(a, precision="bf16"), "cpu")["bf16"]["enabled"]
    assert json.loads(json.dumps(cpu)) == cpu
    assert TrainArgs.from_json(a.to_json()) == a


def test_lr_schedules_warm_up_then_decay():
    cos = lr_lambda_factory("cosine", warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    warm = [cos(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    decay = [cos(s) for s in range(10, 100)]
    assert decay == sorted(decay, reverse=True)
    assert cos(99) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    noam = lr_lambda_factory("noam", warmup_steps=16, total_steps=100, min_lr_ratio=0.0)
    assert noam(15) == pytest.approx(1.0) and noam(63) == pytest.approx(math.sqrt(16 / 64))
    with pytest.raises(ValueError):
        lr_lambda_factory("step", 1, 1, 0.0)
    # under a wall-clock cap the decay follows time when time runs out before the steps do
    frac = {"t": 0.0}
    capped = lr_lambda_factory("cosine", 10, 1000, 0.1, time_progress=lambda: frac["t"])
    early = capped(20)
    assert capped.warm_end == 0.0  # warmup ended at t=0 of the cap
    frac["t"] = 0.5
    assert capped(20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert capped(20) < early
    frac["t"] = 1.0
    assert capped(20) == pytest.approx(0.1)
    # warmup that ends late in the cap: the decay starts from 1 there (no jump), ends at the cap
    frac["t"] = 0.6
    late = lr_lambda_factory("cosine", 10, 1000, 0.1, time_progress=lambda: frac["t"])
    assert late(9) == pytest.approx(1.0) and late(10) == pytest.approx(1.0, abs=1e-3)
    frac["t"] = 0.8
    assert late(11) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_tiny_run_learns_logs_and_packages_a_loadable_model(tmp_path):
    seen_steps, seen_epochs = [], []
    a = tiny_args(tmp_path, epochs=3, num_workers=1, grad_accum=2, lm_texts=True)
    res = train(a, on_step=seen_steps.append, on_epoch_end=lambda e, r: seen_epochs.append((e, r)))
    # grad_accum=2: an optimizer step per 2 of the sampler's batches (whole steps per epoch)
    from model_code.dataset import FeatureTable
    from model_code.sampler import DynamicBucketingSampler

    n_batches = len(DynamicBucketingSampler(FeatureTable(a.train_index).durations(), 2.5, 3, seed=a.seed))
    per_epoch = n_batches // 2
    assert per_epoch >= 3 and res["steps"] == 3 * per_epoch
    assert [r["step"] for r in seen_steps] == list(range(1, res["steps"] + 1))
    losses = [r["loss"] for r in seen_steps]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns
    assert [e for e, _ in seen_epochs] == [0, 1, 2]
    last = seen_epochs[-1][1]
    assert 0.0 <= last["dev_cer"] <= 1.5 and res["dev_cer"] == last["dev_cer"]
    for r in seen_steps:
        assert r["grad_norm"] > 0 and r["audio_s_per_s"] > 0
        assert 0.0 <= r["data_wait_share"] <= 1.0 and 0.0 <= r["padding_share"] < 1.0
    assert last["batch_load_p95_s"] > 0
    # warmup (3 steps) then cosine decay
    lrs = [r["lr"] for r in seen_steps]
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(3e-3) and lrs[-1] < lrs[3]
    # the packaged model is the trained one, and ships the LM built from the transcripts
    out = tmp_path / "out"
    model, tok, info = load_model_dir(out / res["model_dir"])
    assert params_digest(model) == res["params_sha256"]
    assert info["lm"] is not None and "\\data\\" in (out / "model" / "lm.arpa").read_text()
    assert info["meta"]["steps"] == res["steps"]
    lines = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [x["type"] for x in lines].count("epoch") == 3
    assert json.loads((out / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    # the run restored the process-wide settings it changed
    assert not torch.are_deterministic_algorithms_enabled()


def test_bf16_on_a_cpu_computes_under_autocast_and_keeps_fp32_weights(tmp_path, monkeypatch):
    import model_code.training as training

    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)  # autocast runs on any CPU
    ref = train(tiny_args(tmp_path / "fp32", epochs=1, precision="fp32"))
    res = train(tiny_args(tmp_path / "bf16", epochs=1, precision="bf16"))
    assert ref["precision"] == "fp32" and res["precision"] == "bf16-autocast"
    # same seed and batches: the first loss differs only by bf16 rounding of the forward
    l_ref, l_bf = ref["step_log"][0][1], res["step_log"][0][1]  # [step, loss, lr]
    assert l_bf != l_ref and abs(l_bf - l_ref) < 0.02 * l_ref
    model, _, _ = load_model_dir(tmp_path / "bf16" / "out" / res["model_dir"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert params_digest(model) == res["params_sha256"]


def test_time_cap_stops_cleanly_after_a_step_then_evaluates_and_saves(tmp_path):
    a = tiny_args(tmp_path, epochs=50, max_minutes=1e-6, checkpoint_dir=str(tmp_path / "ck"))
    res = train(a)
    assert res["stopped_early"] and res["steps"] == 1 and res["epochs"] == 0
    assert res["history"][-1]["complete"] is False and res["dev_cer"] is not None
    assert (tmp_path / "out" / "model" / "model.json").exists()
    # the same command again: the capped run is finished, nothing more is trained
    again = train(a)
    assert again["steps"] == 1 and again["resumed_from"] == 1


def test_memory_probe_caps_batches_and_is_cached(tmp_path):
    """``use_memory_probe``: per-bucket caps from the probe bound every batch; the cache is reused."""
    from model_code.dataset import FeatureTable
    from model_code.sampler import DynamicBucketingSampler

    cache = tmp_path / "probe.json"
    sampler_cfg = {"max_duration_s": 2.5, "num_buckets": 3, "use_memory_probe": True,
                   "memory_budget_gb": 0.004, "memory_probe_cache": str(cache), "memory_probe_max_batch": 64}
    a = tiny_args(tmp_path / "a", epochs=1, sampler=sampler_cfg, record_batches=True, save_model=False)
    res = train(a)
    caps = res["bucket_batch_sizes"]
    assert res["memory_probed"] and cache.exists() and len(json.loads(cache.read_text())) == 1
    durations = FeatureTable(a.train_index).durations()
    ref = DynamicBucketingSampler(durations, 2.5, 3, seed=a.seed)
    assert len(caps) == ref.num_duration_buckets and min(caps) >= 1
    # the 4 MB budget binds: the duration budget alone makes batches larger than the cap
    assert max(len(b) for b in ref) > min(caps)
    bucket_of = np.searchsorted(ref.boundaries, durations, side="right")
    rows = [json.loads(x) for x in (tmp_path / "a" / "out" / "batches_rank0.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        assert len(row["idx"]) <= min(caps[bucket_of[i]] for i in row["idx"])
    # a second run on the same model and hardware reads the cache: identical caps
    b = tiny_args(tmp_path / "b", epochs=1, sampler=sampler_cfg, save_model=False)
    b.train_index, b.dev_index = a.train_index, a.dev_index
    assert train(b)["bucket_batch_sizes"] == caps and len(json.loads(cache.read_text())) == 1


# -- warm start + replay (continual training) ------------------------------------------------------


def test_warm_start_loads_the_parent_weights_exactly(tmp_path):
    """A zero-LR step from the parent's weights leaves them as they were: the parent's outputs
    are reproduced (dropout off), while the same run from scratch is a different model."""
    parent = train(tiny_args(tmp_path / "p", epochs=1))
    weights = tmp_path / "p" / "out" / "model" / "weights.pt"
    parent_model, _, _ = load_model_dir(weights.parent)
    kw = dict(epochs=1, lr=0.0, weight_decay=0.0, max_steps=1, seed=5)
    warm = train(tiny_args(tmp_path / "w", init_weights=str(weights), **kw))
    cold = train(tiny_args(tmp_path / "c", **kw))
    assert warm["params_sha256"] == parent["params_sha256"] == params_digest(parent_model)
    assert cold["params_sha256"] != parent["params_sha256"]
    child, _, _ = load_model_dir(tmp_path / "w" / "out" / "model")
    x = torch.randn(2, 60, 80)
    lens = torch.tensor([60, 41])
    parent_model.eval()
    child.eval()
    with torch.no_grad():
        a, _ = parent_model(x, lens)
        b, _ = child(x, lens)
    assert torch.equal(a, b)


def test_replay_trains_on_every_new_utterance_and_resumes_exactly(tmp_path):
    """Replay mode: each epoch holds all new-week utterances and the configured share of old
    ones; a run killed mid-epoch resumes to the same weights."""
    from tests.model_code.train_helpers import write_synthetic_index

    data = tmp_path / "data"
    idx = write_synthetic_index(data, 40, seed=1, name="train")
    write_synthetic_index(data, 8, seed=2, name="dev")
    import pyarrow.parquet as pq

    t = pq.read_table(idx)
    batches = ["week-001"] * 30 + ["week-002"] * 10
    t = t.set_column(t.schema.get_field_index("batch"), "batch", pa.array(batches))
    pq.write_table(t, idx)
    replay = {"new_batches": ["week-002"], "share": 0.5, "new_repeats": 1}
    a = tiny_args(tmp_path, epochs=2, replay=replay, record_batches=True, checkpoint_dir=str(tmp_path / "ck"))
    full = train(a)
    ids = [json.loads(x)["idx"] for x in (tmp_path / "out" / "batches_rank0.jsonl").read_text().splitlines()]
    per_epoch = len(ids) // 2
    for e in range(2):
        seen = [i for b in ids[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert set(range(30, 40)) <= set(seen)  # every new utterance, every epoch
        assert sum(1 for i in seen if i < 30) == 10  # old ones: share 0.5 of the epoch
    # resume: the same run SIGKILLed after step 3 (checkpoint every 2) and restarted gives the same weights
    import signal

    from model_code.ds_launch import launch

    b = tiny_args(tmp_path / "r", epochs=2, replay=replay, checkpoint_dir=str(tmp_path / "r" / "ck"),
                  train_index=str(idx), dev_index=a.dev_index, checkpoint_every_steps=2)
    with pytest.raises(RuntimeError, match=f"exited with -{int(signal.SIGKILL)}"):
        launch(b, world_size=1, launcher="inprocess", env={"ASRFLOW_TRAIN_FAULT": "after_step:3"}, poll_s=0.2)
    resumed = launch(b, world_size=1, launcher="inprocess", poll_s=0.2)
    assert resumed["resumed_from"] == 2 and resumed["params_sha256"] == full["params_sha256"]


def _speed_copy(index_path, factor: float):
    """A speed copy of a synthetic index, as featurize + split write one: the same utterances in
    the same order, features stretched in time by 1/factor, durations / factor, its own shard."""
    import pyarrow.parquet as pq

    from model_code.dataset import FeatureTable, shard_table

    t = pq.read_table(index_path)
    table = FeatureTable(index_path)
    feats = []
    for i in range(len(table)):
        f = table.features(i)
        n = max(1, int(round(f.shape[0] / factor)))
        feats.append(f[np.minimum((np.arange(n) * factor).astype(int), f.shape[0] - 1)])
    ids, hashes = t.column("id").to_pylist(), t.column("audio_hash").to_pylist()
    durs = [x / factor for x in t.column("duration_s").to_pylist()]
    shard = index_path.with_name(f"{index_path.stem}_sp{factor:g}_shard.parquet")
    pq.write_table(shard_table(ids, hashes, feats, table.texts(), durs, [None] * len(ids)), shard)
    out = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array([str(shard)] * len(ids)))
    out = out.set_column(out.schema.get_field_index("row"), "row", pa.array(range(len(ids)), pa.int64()))
    out = out.set_column(out.schema.get_field_index("n_frames"), "n_frames", pa.array([f.shape[0] for f in feats], pa.int32()))
    out = out.set_column(out.schema.get_field_index("duration_s"), "duration_s", pa.array(durs, pa.float64()))
    path = index_path.with_name(f"{index_path.stem}_sp{factor:g}.parquet")
    pq.write_table(out, path)
    return path


def test_batch_dataset_loads_the_chosen_speed_copy_and_augments_per_epoch_and_index(tmp_path):
    from model_code.augment import FeatureAugment, variant_choice
    from model_code.dataset import FeatureTable
    from model_code.training import BatchDataset
    from tests.model_code.train_helpers import write_synthetic_index

    idx = write_synthetic_index(tmp_path, 12, seed=1, name="train")
    tables = [FeatureTable(idx), FeatureTable(_speed_copy(idx, 0.9)), FeatureTable(_speed_copy(idx, 1.1))]
    v = variant_choice(4, 1, np.arange(12), 3)
    assert len(set(v.tolist())) == 3
    durs = np.stack([t.durations() for t in tables], axis=1)[np.arange(12), v]
    tok = [[1, 2]] * 12
    aug = FeatureAugment(noise_prob=1.0, noise_snr_db=(10, 10), seed=4)
    ds = BatchDataset(tables[0], tok, durs, [list(range(12))], tables=tables, variants=v, augment=aug, epoch=1)
    b = ds[0]
    n_frames = np.stack([t.n_frames() for t in tables], axis=1)[np.arange(12), v]
    assert b["feat_lens"].tolist() == n_frames.tolist()  # each utterance from its copy
    assert b["audio_s"] == pytest.approx(float(durs.sum()))
    for j in range(12):
        want = aug(tables[int(v[j])].features(j), 1, j)
        np.testing.assert_array_equal(b["feats"][j, : n_frames[j]].numpy(), want)
    np.testing.assert_array_equal(ds[0]["feats"].numpy(), b["feats"].numpy())  # no RNG state: same batch again
    plain = BatchDataset(tables[0], tok, tables[0].durations(), [list(range(12))])[0]
    assert plain["feat_lens"].tolist() == tables[0].n_frames().tolist()


def test_speed_copies_and_feature_noise_train_and_resume_exactly(tmp_path):
    """A run on three speed copies with noise and reverb: a SIGKILLed and restarted run ends with
    the same weights as the uninterrupted one (copies and draws depend on seed, epoch, index only)."""
    import signal

    from model_code.ds_launch import launch
    from tests.model_code.train_helpers import write_synthetic_index

    data = tmp_path / "data"
    idx = write_synthetic_index(data, 40, seed=1, name="train")
    write_synthetic_index(data, 8, seed=2, name="dev")
    variants = [str(_speed_copy(idx, 0.9)), str(_speed_copy(idx, 1.1))]
    augment = {"noise_prob": 0.5, "noise_snr_db": [5.0, 20.0], "reverb_prob": 0.5, "reverb_t60_s": [0.2, 0.6],
               "vtlp_prob": 0.5, "vtlp_alpha": [0.9, 1.1]}
    kw = dict(epochs=2, variant_indexes=variants, augment=augment, train_index=str(idx),
              dev_index=str(data / "dev.parquet"), checkpoint_every_steps=2)
    full = train(tiny_args(tmp_path / "a", checkpoint_dir=str(tmp_path / "a" / "ck"), **kw))
    plain = train(tiny_args(tmp_path / "p", **{**kw, "variant_indexes": [], "augment": {}}))
    assert full["params_sha256"] != plain["params_sha256"]  # the copies and the noise changed what it saw
    b = tiny_args(tmp_path / "r", checkpoint_dir=str(tmp_path / "r" / "ck"), **kw)
    with pytest.raises(RuntimeError, match=f"exited with -{int(signal.SIGKILL)}"):
        launch(b, world_size=1, launcher="inprocess", env={"ASRFLOW_TRAIN_FAULT": "after_step:3"}, poll_s=0.2)
    resumed = launch(b, world_size=1, launcher="inprocess", poll_s=0.2)
    assert resumed["resumed_from"] == 2 and resumed["params_sha256"] == full["params_sha256"]
    # a variant index that does not list the same utterances is refused
    other = write_synthetic_index(data, 40, seed=9, name="other")
    with pytest.raises(ValueError, match="does not list the utterances"):
        train(tiny_args(tmp_path / "x", **{**kw, "variant_indexes": [str(other)]}))


# -- weight averaging ---------------------------------------------------------------------------


def test_weight_ema_follows_its_formula_and_swaps_back():
    from model_code.training import WeightEMA

    lin = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in lin.parameters()]
    ema = WeightEMA(lin, decay=0.9)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    ema.update(1)  # effective decay min(0.9, 2/11)
    d = 2.0 / 11.0
    for s, p0, p in zip(ema.shadow, start, lin.parameters(), strict=True):
        torch.testing.assert_close(s, d * p0 + (1 - d) * p.detach())
    raw = [p.detach().clone() for p in lin.parameters()]
    with ema.swapped():
        for p, s in zip(lin.parameters(), ema.shadow, strict=True):
            assert torch.equal(p.detach(), s)
    for p, r in zip(lin.parameters(), raw, strict=True):
        assert torch.equal(p.detach(), r)  # the raw weights are back
    other = WeightEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow, strict=True))
    with pytest.raises(ValueError, match="tensors"):
        WeightEMA(torch.nn.Linear(3, 3, bias=False), 0.9).load_state_dict(ema.state_dict())


def test_the_weight_average_is_published_and_resumes_exactly(tmp_path):
    """Without a dev set the average is what gets packaged (not the raw weights), and a run
    SIGKILLed after step 3 resumes with the average it had (it travels in the checkpoint)."""
    import signal

    from model_code.ds_launch import launch

    kw = dict(epochs=3, ema_decay=0.8, dev_index=None, checkpoint_every_steps=2)
    full = train(tiny_args(tmp_path / "a", checkpoint_dir=str(tmp_path / "a" / "ck"), **kw))
    assert full["ema"]["used"] == "ema" and full["ema"]["decay"] == 0.8
    plain = train(tiny_args(tmp_path / "p", **{**kw, "ema_decay": 0.0}))
    assert "ema" not in plain and plain["params_sha256"] != full["params_sha256"]  # same run, averaged
    packaged, _, _ = load_model_dir(tmp_path / "a" / "out" / "model")
    assert params_digest(packaged) == full["params_sha256"]
    b = tiny_args(tmp_path / "r", checkpoint_dir=str(tmp_path / "r" / "ck"), **kw)
    with pytest.raises(RuntimeError, match=f"exited with -{int(signal.SIGKILL)}"):
        launch(b, world_size=1, launcher="inprocess", env={"ASRFLOW_TRAIN_FAULT": "after_step:3"}, poll_s=0.2)
    resumed = launch(b, world_size=1, launcher="inprocess", poll_s=0.2)
    assert resumed["resumed_from"] == 2 and resumed["params_sha256"] == full["params_sha256"]


def test_raw_weights_are_kept_when_they_score_better_on_dev(tmp_path):
    """The end-of-run choice: the average is published unless the raw weights have the lower dev CER."""
    from model_code.dataset import FeatureTable
    from model_code.tokenizer import CharTokenizer
    from model_code.training import WeightEMA, _finish_ema

    train(tiny_args(tmp_path, epochs=1))
    model, _, _ = load_model_dir(tmp_path / "out" / "model")
    dev = FeatureTable(tmp_path / "data" / "dev.parquet")
    raw = params_digest(model)
    ema = WeightEMA(model, 0.9)
    for t in ema.shadow:
        t.zero_()  # an average that is certainly different from the raw weights
    common = (dev, CharTokenizer(), torch.device("cpu"), 5.0, torch.float32, 1)
    rec = _finish_ema(ema, model, [{"dev_cer": 2.0, "dev_loss": 1e9, "dev_wer": 2.0}], *common)
    assert rec["used"] == "raw" and params_digest(model) == raw and 0.0 <= rec["dev_cer_raw"] <= 1.5
    rec = _finish_ema(ema, model, [{"dev_cer": -1.0, "dev_loss": 0.0, "dev_wer": 0.0}], *common)
    assert rec["used"] == "ema" and all(float(p.detach().abs().sum()) == 0.0 for p in model.parameters())


def test_intermediate_ctc_changes_the_update_not_the_logged_loss(tmp_path):
    """``inter_ctc_weight`` adds block k's CTC loss to what is minimized: the first step's logged
    loss (the final layer's CTC, same weights and batch) is the same, the updated weights are not."""
    def args(name, **over):
        a = tiny_args(tmp_path / name, epochs=1, max_steps=1, seed=3, save_model=False, **over)
        return dataclasses.replace(a, model_kwargs={**a.model_kwargs, "n_layers": 2})

    base = train(args("a"))
    inter = train(args("b", inter_ctc_weight=0.5, inter_ctc_layer=1))
    assert base["step_log"][0][1] == pytest.approx(inter["step_log"][0][1], rel=1e-6)
    assert base["params_sha256"] != inter["params_sha256"]
    with pytest.raises(ValueError, match="inter_ctc_layer"):
        train(args("c", inter_ctc_weight=0.5, inter_ctc_layer=2))  # the last block is the final output
