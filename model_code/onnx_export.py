"""Export a CTC acoustic model to ONNX, stamp its metadata, quantize it, check parity.

What:
- :func:`export_onnx`: ``torch.onnx.export(..., dynamo=False, dynamic_axes=...)`` of a model with
  the signature ``forward(feats (B, T, n_mels) float32, lengths (B,) int64) -> (log_probs
  (B, T', V), out_lengths (B,))``; inputs are named ``features``/``lengths``, outputs
  ``log_probs``/``out_lengths``; batch and time axes are dynamic (opset ≥ 17).
- :func:`build_metadata` / :func:`set_metadata`: everything a server needs besides the graph
  goes into the file's ``metadata_props`` (tokenizer JSON, log-mel config, sample rate,
  quantization, lineage md5s, git commit, and the lexicon + ARPA LM text for beam search), so one
  ``.onnx`` file is a complete, self-describing model (:class:`model_code.onnx_runtime.OnnxAsr`
  reads it back without torch).
- :func:`quantize_int8`: onnxruntime dynamic quantization (MatMul/Gemm weights to QInt8,
  activations quantized on the fly), metadata carried over.
- :func:`torch_run_fn` / :func:`compare_logprobs`: the torch side of the parity check.

Why dynamo=False: the TorchScript exporter produces a graph whose dynamic axes are declared
explicitly and is what the model was written for (see ``model_code/conformer.py``); the dynamo
exporter's dynamic-shape handling of the masks is not needed here.

Feature extraction (log-mel, ``model_code.features.logmel``) is NOT in the graph: it is a
documented numpy preprocessing step shared by featurize (training) and onnx inference.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_code.onnx_runtime import (
    FORMAT_VERSION,
    INPUT_FEATURES,
    INPUT_LENGTHS,
    META_FEATURES,
    META_FORMAT,
    META_IO,
    META_LEXICON,
    META_LM_ARPA,
    META_QUANT,
    META_SAMPLE_RATE,
    META_TOKENIZER,
    OUTPUT_LENGTHS,
    OUTPUT_LOGPROBS,
    RunFn,
)

INT8_OP_TYPES = ("MatMul", "Gemm")


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    n_mels: int,
    opset: int = 17,
    metadata: dict[str, str] | None = None,
    example_frames: int = 240,
) -> Path:
    """Export ``model`` (put in eval mode) to ``path`` with dynamic batch and time axes.

    The example input is a batch of 2 utterances of ``example_frames`` and ``example_frames*2/3``
    frames (two different lengths, so the length masks are traced as data, not constants).
    ``metadata`` (str → str) is written into ``metadata_props``. Returns the path.
    """
    if opset < 17:
        raise ValueError(f"opset {opset} < 17 (LayerNormalization needs 17)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = torch.randn(2, example_frames, n_mels)
    lens = torch.tensor([example_frames, (example_frames * 2) // 3], dtype=torch.int64)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation + tracer warnings
            torch.onnx.export(
                model,
                (x, lens),
                str(path),
                dynamo=False,
                opset_version=int(opset),
                input_names=[INPUT_FEATURES, INPUT_LENGTHS],
                output_names=[OUTPUT_LOGPROBS, OUTPUT_LENGTHS],
                dynamic_axes={
                    INPUT_FEATURES: {0: "batch", 1: "time"},
                    INPUT_LENGTHS: {0: "batch"},
                    OUTPUT_LOGPROBS: {0: "batch", 1: "frames"},
                    OUTPUT_LENGTHS: {0: "batch"},
                },
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    io = {
        "inputs": {INPUT_FEATURES: ["batch", "time", n_mels], INPUT_LENGTHS: ["batch"]},
        "outputs": {OUTPUT_LOGPROBS: ["batch", "frames", "vocab"], OUTPUT_LENGTHS: ["batch"]},
        "opset": int(opset),
    }
    set_metadata(path, {META_IO: json.dumps(io), **(metadata or {})})
    return path


def build_metadata(
    tokenizer: Any,
    feature_kwargs: dict[str, Any],
    lexicon_text: str | None = None,
    lm_arpa_text: str | None = None,
    quantization: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` of an asrflow ONNX model (all values strings; dicts as JSON).

    ``extra`` keys are prefixed with ``asrflow.`` unless they already contain a dot
    (lineage: ``train_md5``, ``golden_md5``, ``git_commit``...).
    """
    md = {
        META_FORMAT: FORMAT_VERSION,
        META_TOKENIZER: json.dumps(tokenizer.to_dict(), sort_keys=True),
        META_FEATURES: json.dumps(feature_kwargs, sort_keys=True),
        META_SAMPLE_RATE: str(int(feature_kwargs["sample_rate"])),
        META_QUANT: json.dumps(quantization or {"type": "none"}, sort_keys=True),
    }
    if lexicon_text and lm_arpa_text:
        md[META_LEXICON] = lexicon_text
        md[META_LM_ARPA] = lm_arpa_text
    for k, v in (extra or {}).items():
        key = k if "." in k else f"asrflow.{k}"
        md[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return md


def set_metadata(path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Add/replace ``metadata_props`` entries of an ONNX file in place (atomic rewrite)."""
    import onnx

    path = Path(path)
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    props.update({str(k): str(v) for k, v in metadata.items()})
    del m.metadata_props[:]
    for k in sorted(props):
        e = m.metadata_props.add()
        e.key, e.value = k, props[k]
    tmp = path.with_name(f".tmp-{path.name}")
    onnx.save(m, str(tmp))
    os.replace(tmp, path)


def quantize_int8(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], op_types: Sequence[str] = INT8_OP_TYPES
) -> dict[str, Any]:
    """Dynamic int8 quantization of ``src`` into ``dst`` (weights of ``op_types`` → QInt8).

    Returns the quantization settings (also written into ``dst``'s metadata, replacing the fp32
    ``asrflow.quantization`` entry; the other metadata is copied from ``src``).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {
        "type": "dynamic",
        "weight_type": "QInt8",
        "op_types": list(op_types),
        "per_channel": False,
        "tool": "onnxruntime.quantization.quantize_dynamic",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=list(op_types), weight_type=QuantType.QInt8, per_channel=False
        )
    src_md = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    src_md[META_QUANT] = json.dumps(settings, sort_keys=True)
    set_metadata(dst, src_md)
    return settings


def torch_run_fn(model: torch.nn.Module) -> RunFn:
    """Wrap a torch model as the numpy ``run_fn`` that ``onnx_runtime.batched_logprobs`` takes:
    ``(feats (B,T,F) float32, lengths (B,) int64) -> (log_probs (B,T',V), out_lengths (B,))``, eval mode, no grad."""
    model.eval()

    def run(feats: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            lp, ol = model(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)), torch.from_numpy(lengths))
        return lp.float().numpy(), ol.numpy()

    return run


def compare_logprobs(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> dict[str, Any]:
    """Max abs difference between two lists of per-utterance ``(T'_i, V)`` log-probs.

    Returns ``max_abs_diff`` (inf if any shapes differ), ``shapes_equal``, ``argmax_agreement``
    (share of frames whose best token agrees).
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} utterances")
    max_diff, same_shape, agree, frames = 0.0, True, 0, 0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            same_shape = False
            continue
        if x.size:
            max_diff = max(max_diff, float(np.abs(x - y).max()))
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        frames += x.shape[0]
    return {
        "max_abs_diff": max_diff if same_shape else float("inf"),
        "shapes_equal": same_shape,
        "argmax_agreement": agree / frames if frames else 1.0,
    }
