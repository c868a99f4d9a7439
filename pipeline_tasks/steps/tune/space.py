"""The tune step's search space: validation, conditional sampling, derived overrides, model size."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

from pipeline_tasks.config import AsrflowConfig, SearchParam
from pipeline_tasks.services.fitting import model_kwargs

log = logging.getLogger(__name__)



def _get_dotted(d: dict[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def validate_space(cfg: AsrflowConfig) -> None:
    """Fail early, with a readable message, on space keys or conditions that cannot work."""
    d = cfg.dump()
    for name, p in cfg.tune.space.items():
        try:
            base = _get_dotted(d, name)
        except KeyError as e:
            raise ValueError(f"tune.space: {name!r} is not a config key") from e
        if isinstance(base, dict):
            raise ValueError(f"tune.space: {name!r} is a config section, not a value")
        for dep in p.condition or {}:
            if dep == name:
                raise ValueError(f"tune.space: {name!r} is conditioned on itself")
            if dep not in cfg.tune.space:
                try:
                    _get_dotted(d, dep)
                except KeyError as e:
                    raise ValueError(f"tune.space: condition of {name!r} names unknown key {dep!r}") from e
    _sampling_order(cfg.tune.space)  # raises on cyclic conditions
    if "train.augment.speed_perturb" in cfg.tune.space and not cfg.features.speed_variants:
        raise ValueError(
            "tune.space: train.augment.speed_perturb needs speed-perturbed features: set "
            "features.speed_factors (e.g. [0.9, 1.0, 1.1])"
        )


def _sampling_order(space: dict[str, SearchParam]) -> list[str]:
    """Params in an order where every condition's params come before the params they gate."""
    order: list[str] = []
    pending = dict(space)
    while pending:
        ready = [n for n, p in pending.items() if not any(dep in pending for dep in (p.condition or {}))]
        if not ready:
            raise ValueError(f"tune.space: cyclic conditions among {sorted(pending)}")
        for n in ready:
            order.append(n)
            del pending[n]
    return order


def _matches(value: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_matches(value, w) for w in want)
    if isinstance(value, float) or isinstance(want, float):
        with contextlib.suppress(TypeError, ValueError):
            return math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return value == want


def _suggest(trial, name: str, p: SearchParam) -> Any:
    if p.type == "float":
        return trial.suggest_float(name, float(p.low), float(p.high), log=p.log, step=p.step)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_categorical(name, list(p.choices))


def sample_params(trial, cfg: AsrflowConfig, warm: bool = False) -> dict[str, Any]:
    """Sample ``tune.space`` into ``{dotted key: value}``; conditional params only when active.

    A condition ``{dep: want}`` holds when ``dep``'s value (sampled, or the base config's when
    ``dep`` is not in the space) equals ``want`` (or is one of ``want`` when it is a list).
    ``warm_only`` params are sampled only for warm-started trials (they change nothing else).
    """
    space = cfg.tune.space
    base = cfg.dump()
    values: dict[str, Any] = {}
    for name in _sampling_order(space):
        p = space[name]
        active = warm or not p.warm_only
        for dep, want in (p.condition or {}).items():
            if dep in space:
                if dep not in values or not _matches(values[dep], want):
                    active = False
            elif not _matches(_get_dotted(base, dep), want):
                active = False
        if active:
            values[name] = _suggest(trial, name, p)
    return values


def derive_overrides(cfg: AsrflowConfig, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn sampled params into the config overrides a trial (and the train step) applies.

    Returns ``(overrides, info)``; ``info`` says what was derived (lr scale, heads change).
    """
    overrides = dict(params)
    info: dict[str, Any] = {}
    if "train.sampler.max_duration_s" in params and cfg.tune.lr_scaling != "none":
        b0 = float(cfg.train.sampler.max_duration_s)
        ratio = float(params["train.sampler.max_duration_s"]) / b0
        scale = math.sqrt(ratio) if cfg.tune.lr_scaling == "sqrt" else ratio
        lr = float(params.get("train.lr", cfg.train.lr))
        overrides["train.lr"] = lr * scale
        info["lr_scale"] = scale
        info["lr_unscaled"] = lr
    d_model = int(overrides.get("model.d_model", cfg.model.d_model))
    heads = int(overrides.get("model.n_heads", cfg.model.n_heads))
    if d_model % heads:
        new_heads = max(h for h in range(1, heads + 1) if d_model % h == 0)
        overrides["model.n_heads"] = new_heads
        info["n_heads_adjusted"] = [heads, new_heads]
    return overrides, info


def estimate_params(cfg: AsrflowConfig, vocab_size: int | None = None) -> int:
    """Parameter count of the model ``cfg`` describes.

    Exact when ``model_code.conformer`` is importable (the model is built on torch's ``meta``
    device: no memory, no time); otherwise a close analytic count of a Conformer-CTC.
    """
    if vocab_size is None:
        vocab_size = cfg.model.bpe_vocab_size if cfg.model.vocab == "bpe" else 32
    kw = model_kwargs(cfg, vocab_size)
    try:
        import torch

        from model_code.conformer import ConformerCTC

        with torch.device("meta"):
            model = ConformerCTC(**kw)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - fall back to the analytic count
        pass
    d, f, k, c, n = kw["d_model"], kw["ff_mult"], kw["conv_kernel"], kw["subsampling_channels"], kw["n_mels"]
    ffn = 2 * (d * f * d + f * d + f * d * d + d + 2 * d)
    mhsa = 4 * (d * d + d) + 2 * d
    conv = (2 * d * d + 2 * d) + (k * d + d) + 4 * d + (d * d + d) + 2 * d
    layer = ffn + mhsa + conv + 2 * d
    sub = (9 * c + c) + (9 * c * c + c) + c * ((n + 3) // 4) * d + d
    return int(sub + kw["n_layers"] * layer + d * vocab_size + vocab_size)
