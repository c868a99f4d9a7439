"""One training step of the acoustic model alone, by implementation variant, side by side.

    .venv/bin/python bench/step_profile.py [--profile local] [--batch 12] [--frames 340]
                                           [--rounds 5] [--steps 10] [--json F]

Times forward + CTC + backward + AdamW of ``ConformerCTC`` built from the profile's model settings,
on one synthetic batch shaped like the local profile's (12 utterances × 3.4 s ≈ its 40 s
batches), SpecAugment on, for every combination of

* dropout: ``torch`` (``nn.Dropout``: one Mersenne-Twister draw per element) or ``packed``
  (``model_code.conformer.packed_dropout``: four 16-bit uniforms per 64-bit draw);
* front end: ``nchw`` (plain ``nn.Conv2d``) or ``nhwc`` (``Conv2dNHWC``: a channels-last weight);
* precision: fp32, and bf16 autocast where the CPU has native bf16 (or on CUDA).

The variants run interleaved, ``--rounds`` times ``--steps`` steps each, so machine noise hits
all of them alike; the figure is the median ms per step over rounds and the speed ratio to the
``torch``/``nchw`` variant of the same precision. The real loop (DeepSpeed, sampler, data, logging)
adds its own fixed cost per step: ``bench/train_throughput.py`` measures that. Nothing asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(cfg, dropout_impl: str, front_end: str):
    import torch

    from model_code.conformer import ConformerCTC, Conv2dNHWC, Dropout
    from pipeline_tasks.services.fitting import model_kwargs

    torch.manual_seed(0)
    m = ConformerCTC(**model_kwargs(cfg, 29)).train()
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if dropout_impl == "torch" and isinstance(child, Dropout):  # PyTorch's own, same p
                setattr(parent, name, torch.nn.Dropout(child.p))
            if front_end == "nchw" and isinstance(child, Conv2dNHWC):  # same weights, plain NCHW
                child.__class__ = torch.nn.Conv2d
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="local")
    p.add_argument("--batch", type=int, default=12, help="utterances per batch")
    p.add_argument("--frames", type=int, default=340, help="feature frames per utterance (100/s)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args(argv)

    import torch

    from model_code.conformer import SpecAugment
    from model_code.training import cpu_has_native_bf16, ctc_loss
    from pipeline_tasks.config import load_config

    torch.set_num_threads(ns.threads or (os.cpu_count() or 1))
    cfg = load_config(ns.profile, [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = ["fp32"] + (["bf16"] if device == "cuda" or cpu_has_native_bf16() else [])
    gen = torch.Generator().manual_seed(0)
    b, t = ns.batch, ns.frames
    feats = (torch.randn(b, t, cfg.features.n_mels, generator=gen) * 3 + 5).to(device)
    lens = torch.full((b,), t, device=device)
    lens[-b // 4 :] = int(t * 0.9)
    tokens = torch.randint(1, 29, (b, t // 8), generator=gen).to(device)
    token_lens = torch.full((b,), t // 8, device=device)
    spec = SpecAugment(**cfg.train.specaugment.model_dump()) if cfg.train.specaugment else None

    variants = [(d, f, pr) for pr in precisions for d in ("torch", "packed") for f in ("nchw", "nhwc")]
    models = {v: build(cfg, v[0], v[1]).to(device) for v in variants}
    opts = {v: torch.optim.AdamW(models[v].parameters(), lr=1e-4) for v in variants}

    def step(v) -> None:
        m, opt = models[v], opts[v]
        x = spec(feats, lens) if spec is not None else feats
        with torch.autocast(device, dtype=torch.bfloat16, enabled=v[2] == "bf16"):
            lp, ol = m(x, lens)
        loss = ctc_loss(lp, ol, tokens, token_lens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict = {v: [] for v in variants}
    for v in variants:  # warm-up: allocator, oneDNN primitive caches
        for _ in range(3):
            step(v)
    for _ in range(ns.rounds):
        for v in variants:
            t0 = time.perf_counter()
            for _ in range(ns.steps):
                step(v)
            times[v].append((time.perf_counter() - t0) / ns.steps)

    rows = []
    for v in variants:
        base = statistics.median(times[("torch", "nchw", v[2])])
        med = statistics.median(times[v])
        rows.append({"dropout": v[0], "front_end": v[1], "precision": v[2], "ms_per_step": 1000 * med,
                     "speed_vs_torch_nchw": base / med, "rounds_ms": [round(1000 * x, 2) for x in times[v]]})
    cmd = " ".join([".venv/bin/python", "bench/step_profile.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# model step (fwd + CTC + bwd + AdamW), profile {ns.profile}: {cfg.model.d_model}d x "
          f"{cfg.model.n_layers} layers, dropout {cfg.model.dropout}; batch {b} x {t} frames; device {device}; "
          f"threads {torch.get_num_threads()}; {ns.rounds} rounds x {ns.steps} steps, interleaved")
    print("dropout | front_end | precision | ms_per_step | speed_vs_torch_nchw")
    for r in rows:
        print(f"{r['dropout']} | {r['front_end']} | {r['precision']} | {r['ms_per_step']:.1f} | "
              f"{r['speed_vs_torch_nchw']:.2f}")
    print(f"# command: {cmd}")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"command": cmd, "device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
