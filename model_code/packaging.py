"""The packaged model folder: what training writes and export / evaluate / transcribe read.

Layout::

    <dir>/weights.pt    state_dict (tensors only; loaded with ``torch.load(weights_only=True)``)
    <dir>/model.json    {"model_kwargs": {...ConformerCTC kwargs...},
                         "tokenizer": {...tokenizer.to_dict()...},
                         "features": {...log-mel kwargs...},
                         "lm": {"lexicon": "lexicon.txt", "arpa": "lm.arpa"} | null,
                         "meta": {...free-form, JSON-able...},
                         "format_version": 1}
    <dir>/lexicon.txt   optional flashlight lexicon   (see model_code.lm.build_lexicon)
    <dir>/lm.arpa       optional word n-gram LM        (see model_code.lm.build_arpa)

Every file is written to a temporary name in the same folder and moved into place with
``os.replace`` (atomic on POSIX), ``model.json`` last, so a reader never sees a half-written
file and a folder with ``model.json`` is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model_dir(
    path: str | os.PathLike[str],
    model,
    model_kwargs: dict[str, Any],
    tokenizer,
    feature_kwargs: dict[str, Any],
    lm_texts: list[str] | None = None,
    meta: dict[str, Any] | None = None,
    lm_order: int = 3,
) -> Path:
    """Write a model folder (created if needed). Returns its path.

    ``model`` is a ``ConformerCTC`` (or anything with ``state_dict()``; a DeepSpeed/DDP wrapper's
    ``.module`` is unwrapped). With ``lm_texts`` the lexicon (their distinct words) and an
    ``lm_order``-gram ARPA LM are built from them.
    """
    from model_code.lm import build_arpa, build_lexicon, lexicon_words

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    inner = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    _atomic_torch_save(out / "weights.pt", state)

    lm_info = None
    if lm_texts is not None:
        texts = [t for t in lm_texts if t and t.strip()]
        _atomic_write_bytes(out / "lexicon.txt", build_lexicon(lexicon_words(texts), tokenizer).encode())
        _atomic_write_bytes(out / "lm.arpa", build_arpa(texts, order=lm_order).encode())
        lm_info = {"lexicon": "lexicon.txt", "arpa": "lm.arpa"}
    else:  # no LM: remove stale LM files from an earlier save into the same folder
        for name in ("lexicon.txt", "lm.arpa"):
            (out / name).unlink(missing_ok=True)
    info = {
        "format_version": FORMAT_VERSION,
        "model_kwargs": dict(model_kwargs),
        "tokenizer": tokenizer.to_dict(),
        "features": dict(feature_kwargs),
        "lm": lm_info,
        "meta": dict(meta or {}),
    }
    _atomic_write_bytes(out / "model.json", json.dumps(info, indent=2, sort_keys=True).encode())
    return out


def read_model_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``model.json`` of a model folder, with ``lm`` paths made absolute (no torch import)."""
    p = Path(path)
    info = json.loads((p / "model.json").read_text())
    if info.get("lm"):
        info["lm"] = {k: str(p / v) for k, v in info["lm"].items()}
    return info


def load_model_dir(path: str | os.PathLike[str], map_location: str = "cpu"):
    """Read a model folder → ``(model in eval mode, tokenizer, info)``.

    ``info`` is ``model.json`` with the ``lm`` file names resolved to absolute paths.
    """
    import torch

    from model_code.conformer import ConformerCTC
    from model_code.tokenizer import tokenizer_from_dict

    p = Path(path)
    info = read_model_info(p)
    tokenizer = tokenizer_from_dict(info["tokenizer"])
    model = ConformerCTC(**info["model_kwargs"])
    state = torch.load(p / "weights.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, tokenizer, info
