"""What the decoder adds on top of a trained model: greedy vs beam, lexicon, LM weight, OOV cost.

For one packaged model folder (``weights.pt`` + ``model.json`` + ``lexicon.txt`` + ``lm.arpa``,
e.g. ``<root>/train/<key>/model``) the log-probs of the dev split and of the golden set are
computed once (torch, from the cached features), then decoded several ways:

* greedy CTC; lexicon-free beam search without LM; lexicon-constrained beam without LM;
* lexicon + LM (the gate's decoder) at the profile's ``decode.lm_weight`` / ``word_score`` and on a
  grid of both, **chosen on dev only**; golden WER is printed for the default and for the dev
  choice, never used to choose;
* a sizing row, not a decoder anyone can ship: the lexicon plus the golden set's own out-of-lexicon
  words. The gap to the default row is what the closed training lexicon costs on the golden set.

Printed: WER/CER on dev and golden, golden WER per synthesizer, the golden out-of-lexicon rate,
and the command that reproduces it.

    .venv/bin/python bench/decoding.py                     # the local profile's root: newest train/*/model
    .venv/bin/python bench/decoding.py --root R            # R/train/<newest>/model, R/split, R/golden
    .venv/bin/python bench/decoding.py --model M --root R --json bench/results/decoding.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CMD = " ".join(["python", *sys.argv])


def _newest(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {root}/{pattern}: run the pipeline (or bench/capacity.py) first")
    return found[-1]


def logprobs(model, index: Path) -> list[tuple[str, str, object]]:
    """(id, reference text, (T', V) log-probs) per row of a feature index, in index order."""
    import torch

    from model_code.dataset import FeatureTable

    table = FeatureTable(index)
    out = []
    with torch.no_grad():
        for i, (uid, text) in enumerate(zip(table.ids(), table.texts(), strict=True)):
            x = torch.from_numpy(table.features(i))[None]  # (1, T, n_mels) float32
            lp, olen = model(x, torch.tensor([x.shape[1]]))  # (1, T', V), (1,)
            out.append((uid, text, lp[0, : int(olen[0])].numpy()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="", help="artifact root with train/, split/ and golden/ (default: the profile's)")
    ap.add_argument("--model", default="", help="model folder (default: the newest <root>/train/*/model)")
    ap.add_argument("--profile", default="local")
    ap.add_argument("--lm-weights", default="0.3,0.5,0.8,1.2,1.6")
    ap.add_argument("--word-scores", default="-1,0,1")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from model_code.decoding import BeamDecoder, greedy_decode
    from model_code.lm import build_lexicon
    from model_code.metrics import error_counts
    from model_code.packaging import load_model_dir
    from pipeline_tasks.config import load_config

    torch.set_num_threads(1)
    root = Path(args.root or load_config(args.profile).paths.root)
    if not args.model and not any(root.glob("train/*/model/weights.pt")):
        print(f"bench/decoding.py: skipped, no trained model under {root} (run `make pipeline-local` first)")
        return 0
    mdir = Path(args.model) if args.model else _newest("train/*/model", root)
    model, tok, info = load_model_dir(mdir)
    dev = logprobs(model, _newest("split/*/dev.parquet", root))
    gidx = _newest("golden/*/index.parquet", root)
    gold = logprobs(model, gidx)
    synth = {r["id"]: r["synth"] for r in pq.read_table(gidx.parent / "slices.parquet").to_pylist()}
    lex, arpa = info["lm"]["lexicon"], info["lm"]["arpa"]
    lex_words = [line.split("\t")[0] for line in Path(lex).read_text().splitlines() if line.strip()]
    gold_words = [w for _, t, _ in gold for w in t.split()]
    in_lexicon = set(lex_words)
    oov = [w for w in gold_words if w not in in_lexicon]
    d = load_config(args.profile).decode

    rows: list[dict] = []

    def beam(lexicon: str | None, lm: str | None, lw: float = d.lm_weight, ws: float = d.word_score):
        return BeamDecoder(tok, lexicon, lm, beam_size=d.beam_size, lm_weight=lw, word_score=ws).decode_one

    def score(name: str, decode, sets=("dev", "golden")) -> dict:
        t0 = time.process_time()
        row: dict = {"decoder": name}
        for sname, data in (("dev", dev), ("golden", gold)):
            if sname not in sets:
                continue
            hyps = [decode(lp) for _, _, lp in data]
            e = error_counts([t for _, t, _ in data], hyps)
            row[f"{sname}_wer"], row[f"{sname}_cer"] = round(e["wer"], 4), round(e["cer"], 4)
            if sname == "golden":
                per: dict[str, tuple[list, list]] = {}
                for (i, t, _), h in zip(data, hyps, strict=True):
                    per.setdefault(synth.get(i, "?"), ([], []))
                    per[synth.get(i, "?")][0].append(t)
                    per[synth.get(i, "?")][1].append(h)
                row["golden_by_synth"] = {k: round(error_counts(*v)["wer"], 4) for k, v in sorted(per.items())}
        row["cpu_s"] = round(time.process_time() - t0, 2)
        rows.append(row)
        print(f"  {name:<44} " + "  ".join(f"{k} {v}" for k, v in row.items() if k != "decoder"), flush=True)
        return row

    print(f"model {mdir} ({info.get('meta', {}).get('steps', '?')} steps); dev {len(dev)} utts, golden {len(gold)} utts")
    print(f"golden out-of-lexicon words: {len(oov)} of {len(gold_words)} ({100 * len(oov) / max(1, len(gold_words)):.1f} %),"
          f" lexicon {len(lex_words)} words")  # fmt: skip
    score("greedy", lambda lp: greedy_decode(lp[None], [lp.shape[0]], tok)[0])
    score("beam, lexicon-free, no LM", beam(None, None))
    score("beam, lexicon, no LM", beam(lex, None))
    default = score(f"beam, lexicon + LM (default lw {d.lm_weight} ws {d.word_score})", beam(lex, arpa))
    grid = []
    for lw in [float(x) for x in args.lm_weights.split(",")]:
        for ws in [float(x) for x in args.word_scores.split(",")]:
            r = score(f"  grid lw {lw} ws {ws} (dev only)", beam(lex, arpa, lw, ws), ("dev",))
            grid.append((r["dev_wer"], lw, ws))
    _, blw, bws = min(grid)
    chosen = score(f"beam, lexicon + LM (dev choice lw {blw} ws {bws})", beam(lex, arpa, blw, bws))
    sizing = Path(tempfile.mkdtemp(prefix="asrflow-bench-decoding-")) / "lexicon.txt"  # not in the artifacts
    sizing.write_text(build_lexicon(sorted(set(lex_words) | set(oov)), tok))
    oracle = score("SIZING ONLY: lexicon + golden's OOV words, default LM", beam(str(sizing), arpa))
    shutil.rmtree(sizing.parent)
    print(f"dev choice vs default: golden WER {chosen['golden_wer']} vs {default['golden_wer']}; "
          f"closed lexicon costs {default['golden_wer'] - oracle['golden_wer']:+.4f} golden WER")
    print(f"reproduce: .venv/bin/{CMD}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cmd": CMD, "model": str(mdir), "oov_rate": len(oov) / max(1, len(gold_words)),
                                               "rows": rows}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
