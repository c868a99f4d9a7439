"""What the tune step reports beside the best config: plots, parameter importances, the proxy-fidelity check."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import (
    resolve,
)
from pipeline_tasks.services.tracking import mlflow_call
from pipeline_tasks.steps.tune.objective import (
    TrialContext,
    TrialFn,
    _trial_cfg,
    proxy_speed_subsets,
    proxy_subset,
)
from pipeline_tasks.steps.tune.study import STEP

log = logging.getLogger(__name__)



def _plots(study, cfg: AsrflowConfig, out: Path) -> list[str]:
    """Optimization history, intermediate values, importances (+ Pareto front): HTML + PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vmpl

    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    mo = cfg.tune.multi_objective
    wer_target = (lambda t: t.values[0]) if mo else None
    plots: dict[str, tuple[Callable, Callable, dict[str, Any]]] = {
        "optimization_history": (
            vis.plot_optimization_history,
            vmpl.plot_optimization_history,
            {"target": wer_target, "target_name": "dev WER"} if mo else {"target_name": "dev WER"},
        ),
        "param_importances": (
            vis.plot_param_importances,
            vmpl.plot_param_importances,
            {"target": wer_target, "target_name": "dev WER"} if mo else {"target_name": "dev WER"},
        ),
    }
    if not mo:
        plots["intermediate_values"] = (vis.plot_intermediate_values, vmpl.plot_intermediate_values, {})
    else:
        plots["pareto_front"] = (
            vis.plot_pareto_front,
            vmpl.plot_pareto_front,
            {"target_names": ["dev WER", "latency ms/s"]},
        )
    for name, (html_fn, png_fn, kw) in plots.items():
        try:
            fig = html_fn(study, **kw)
            p = out / f"{name}.html"
            fig.write_html(str(p), include_plotlyjs="directory")
            written.append(p.name)
        except Exception as e:  # noqa: BLE001 - e.g. importances need 2+ complete trials
            log.warning("tune: %s.html not written: %s", name, e)
        try:
            ax = png_fn(study, **kw)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            p = out / f"{name}.png"
            fig.savefig(p, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(p.name)
        except Exception as e:  # noqa: BLE001
            log.warning("tune: %s.png not written: %s", name, e)
    return written


def _importances(study, cfg: AsrflowConfig) -> dict[str, Any]:
    import optuna

    target = (lambda t: t.values[0]) if cfg.tune.multi_objective else None
    out: dict[str, Any] = {}
    for label, ev in (
        ("fanova", lambda: optuna.importance.FanovaImportanceEvaluator(seed=cfg.tune.sampler_seed)),
        (
            "mean_decrease_impurity",
            lambda: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=cfg.tune.sampler_seed),
        ),
    ):
        try:
            out[label] = optuna.importance.get_param_importances(study, evaluator=ev(), target=target)
        except Exception as e:  # noqa: BLE001 - fewer than 2 complete trials, or a constant param
            out[label] = None
            out[f"{label}_error"] = str(e)
    return out


def _fidelity_check(
    cfg: AsrflowConfig, inputs: dict[str, dict[str, Any]], study, fn: TrialFn, parent: str | None
) -> dict[str, Any]:
    """Retrain the top-k proxy configs at higher fidelity; Spearman rho of the two rankings.

    Higher fidelity = ``ceil(fidelity_epochs_factor * tune.epochs)`` epochs on the *full* proxy
    split (``proxy_fraction`` ignored). A rho near 1 says the proxy ranks configs like the
    bigger run would; near 0 or negative says the proxy is too cheap to be trusted.
    """
    from optuna.trial import TrialState
    from scipy.stats import spearmanr

    t = cfg.tune
    done = [x for x in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done.sort(key=lambda x: x.values[0])
    top = done[: t.fidelity_check_top_k]
    epochs = math.ceil(t.epochs * t.fidelity_epochs_factor)
    split = inputs["split"]
    rows = []
    for x in top:
        overrides = x.user_attrs.get("overrides", x.params)
        ctx = TrialContext(
            proxy_index=proxy_subset(cfg, inputs, fraction=1.0),
            dev_index=resolve(split, split["dev"]),
            out_dir=cfg.root / STEP / "_work" / study.study_name / f"fidelity-{x.number:04d}",
            epochs=epochs,
            multi_objective=False,
            latency_max_utts=t.latency_max_utts,
            trial_number=x.number,
            parent=inputs.get("parent"),
            proxy_speed=proxy_speed_subsets(cfg, inputs, fraction=1.0),
        )
        shutil.rmtree(ctx.out_dir, ignore_errors=True)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        run = None
        if parent:
            import mlflow

            run = mlflow_call(
                "start fidelity run",
                lambda n=x.number: mlflow.start_run(
                    run_name=f"fidelity-{n:04d}",
                    parent_run_id=parent,
                    tags={
                        "asrflow.step": STEP,
                        "optuna.study": study.study_name,
                        "fidelity_of_trial": str(n),
                    },
                ),
            )
        status = "FAILED"
        try:
            res = fn(_trial_cfg(cfg, overrides, epochs), ctx, lambda e, m: None)
            status = "FINISHED"
        finally:
            if run is not None:
                mlflow_call("end fidelity run", lambda s=status: mlflow.end_run(status=s), retries=1)
            shutil.rmtree(ctx.out_dir, ignore_errors=True)
        rows.append({"trial": x.number, "proxy_wer": x.values[0], "hifi_wer": float(res["dev_wer"])})
    rho = p = None
    if len(rows) >= 2:
        r = spearmanr([r["proxy_wer"] for r in rows], [r["hifi_wer"] for r in rows])
        rho = None if math.isnan(r.statistic) else float(r.statistic)
        p = None if math.isnan(r.pvalue) else float(r.pvalue)
    return {"k": len(rows), "epochs": epochs, "trials": rows, "spearman_rho": rho, "p_value": p}
