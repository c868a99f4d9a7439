"""The ``asrflow`` command line: a thin wrapper over the step functions.

    asrflow STEP [--profile local] [--set key.sub=value ...] [--force]
    asrflow run STEP ...                 (same thing)
    asrflow pipeline                     (every step, in one process, no Airflow)
    asrflow corpus generate|golden ...   (the embedded synthetic corpus)
    asrflow config show                  (the validated config, overrides applied)
    asrflow lineage models:/asr/N        (a model's chain of parents, data and gate figures)
    asrflow status [--json]              (aliases, last DAG runs, pending landing batches, storage)

A step run from the CLI first resolves its inputs by running its upstream steps; those
are keyed and cached, so on a warm artifact root this only reads their results.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline_tasks.graph import GRAPH, ORDER

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
corpus_app = typer.Typer(no_args_is_help=True, help="Generate the embedded synthetic speech corpus (espeak-ng, Festival; flite for the golden set).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration profiles.")
app.add_typer(corpus_app, name="corpus")
app.add_typer(config_app, name="config")

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="profile name in configs/ or a YAML path")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.epochs=3 (repeatable)")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="recompute this step even if its output exists")]


# asrflow's own loggers: INFO on the console. Everything else (Great Expectations, MLflow,
# DeepSpeed, Airflow, alembic, urllib3...) only from WARNING unless -v/--verbose.
OWN_LOGGERS = ("pipeline_tasks", "model_code", "synth", "data_contracts", "devstack", "__main__")
_VERBOSE = {"on": False}


@app.callback()
def _global_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also show third-party INFO logs")] = False,
) -> None:
    """asrflow: continuous retraining of a speech recognizer (see README.md)."""
    _VERBOSE["on"] = verbose


def _setup_logging(verbose: bool | None = None) -> None:
    verbose = _VERBOSE["on"] if verbose is None else verbose
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # libraries that set their own logger levels (GX sets INFO) are filtered at the handler
        for h in root.handlers:
            if not any(isinstance(f, _QuietThirdParty) for f in h.filters):
                h.addFilter(_QuietThirdParty())


class _QuietThirdParty(logging.Filter):
    """Pass asrflow's own records, and everything else only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS


def _load(profile: str, overrides: list[str] | None):
    from pipeline_tasks.config import load_config

    try:
        return load_config(profile, overrides or [])
    except Exception as e:  # pydantic errors are readable; show them without a traceback
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from e


# Errors that describe bad input or a broken data contract: shown as a short message, not a
# traceback (the step's own report, e.g. validate's Data Docs, has the details).
USER_ERRORS = {
    "DataContractError",
    "LandingError",
    "GoldenSetError",
    "CorpusError",
    "WorkspaceError",
    "WorkspaceLockTimeout",
    "ExportParityError",
    "FileNotFoundError",
}


def _run_guarded(fn):
    try:
        return fn()
    except Exception as e:
        if type(e).__name__ in USER_ERRORS:
            typer.echo(f"error ({type(e).__name__}): {e}", err=True)
            raise typer.Exit(1) from e
        raise


def _run_step(step: str, profile: str, overrides: list[str] | None, force: bool) -> None:
    from pipeline_tasks.graph import run_until

    _setup_logging()
    cfg = _load(profile, overrides)
    results = _run_guarded(lambda: run_until(step, cfg, force={step} if force else False))
    typer.echo(json.dumps(results[step], indent=2, sort_keys=True, default=str))


def _make_step_command(step: str):
    def cmd(
        profile: ProfileOpt = "local",
        overrides: SetOpt = None,
        force: ForceOpt = False,
    ) -> None:
        _run_step(step, profile, overrides, force)

    cmd.__doc__ = f"Run the {step!r} step (and, cached, the steps it depends on: {', '.join(GRAPH[step]) or 'none'})."
    return cmd


for _step in ORDER:
    if _step == "evaluate":
        continue  # `asrflow evaluate` is the model-on-manifest command (see below)
    app.command(name=_step)(_make_step_command(_step))


@app.command("run")
def run_cmd(
    step: Annotated[str, typer.Argument(help=f"one of: {', '.join(ORDER)}")],
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run one pipeline step by name (the DAG's tasks, without Airflow)."""
    if step not in GRAPH:
        typer.echo(f"unknown step {step!r}; steps: {', '.join(ORDER)}", err=True)
        raise typer.Exit(2)
    _run_step(step, profile, overrides, force)


@app.command("pipeline")
def pipeline_cmd(
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
    until: Annotated[str, typer.Option(help="last step to run")] = "promote",
    force: Annotated[bool, typer.Option("--force", help="recompute every step")] = False,
) -> None:
    """Run the whole pipeline in this process (no Airflow); every step is cached."""
    from pipeline_tasks.graph import run_until

    _setup_logging()
    cfg = _load(profile, overrides)
    results = _run_guarded(lambda: run_until(until, cfg, force=force))
    typer.echo(json.dumps(results, indent=2, sort_keys=True, default=str))


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="models:/asr@production, models:/asr@staging or a .onnx path")] = "",
    manifest: Annotated[Path | None, typer.Option(help="NeMo-style JSONL manifest with transcripts")] = None,
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """WER/CER of MODEL on MANIFEST; without --model, run the pipeline's golden-set gate step."""
    if not model:
        _run_step("evaluate", profile, overrides, force)
        return
    if manifest is None:
        typer.echo("--manifest is required with --model", err=True)
        raise typer.Exit(2)
    from pipeline_tasks.services import inference

    _setup_logging()
    cfg = _load(profile, overrides)
    out = inference.evaluate_manifest(cfg, model, manifest)
    typer.echo(json.dumps(out, indent=2, sort_keys=True))


@app.command("transcribe")
def transcribe_cmd(
    audio: Annotated[list[Path] | None, typer.Argument(help="audio files (any sample rate, any length)")] = None,
    model: Annotated[str, typer.Option(help="models:/asr@production, models:/asr@staging or a .onnx path")] = "models:/asr@staging",
    manifest: Annotated[Path | None, typer.Option(help="NeMo-style JSONL manifest")] = None,
    output: Annotated[Path | None, typer.Option(help="write JSONL here instead of stdout")] = None,
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
) -> None:
    """Transcribe audio with an exported model (onnxruntime; no torch needed)."""
    from pipeline_tasks.services import inference

    _setup_logging()
    cfg = _load(profile, overrides)
    if not audio and manifest is None:
        typer.echo("give audio files or --manifest", err=True)
        raise typer.Exit(2)
    inference.transcribe_cli(cfg, model, list(audio or []), manifest, output)


@app.command("promote-production")
def promote_production_cmd(
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="move production back to previous-production")] = False,
) -> None:
    """Canary-check `staging` on the newest dev data, then move `production` to it (or roll back)."""
    from pipeline_tasks.steps import promote

    _setup_logging()
    cfg = _load(profile, overrides)
    out = promote.rollback(cfg) if rollback else promote.promote_production(cfg)
    typer.echo(json.dumps(out, indent=2, sort_keys=True, default=str))


@app.command("lineage")
def lineage_cmd(
    model: Annotated[str, typer.Argument(help="models:/asr/N or models:/asr@production")] = "models:/asr@production",
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The chain of parents of a model version: data snapshot, gate figures, training minutes."""
    from pipeline_tasks.services.registry import lineage

    cfg = _load(profile, overrides)
    try:
        chain = lineage(cfg, model)
    except (ValueError, LookupError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if as_json:
        typer.echo(json.dumps(chain, indent=2, sort_keys=True))
        return
    def wer(x) -> str:  # registry tags are strings ("0.6431312356101304", "none")
        try:
            return f"{float(x):.4f}"
        except (TypeError, ValueError):
            return "?"

    for i, v in enumerate(chain):
        al = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
        champ = v["gate_champion_version"]
        vs = f"vs v{champ} {wer(v['gate_champion_wer'])}" if champ not in (None, "", "none") else "(no champion)"
        new = ",".join(v["new_batches"]) or "–"
        typer.echo(
            f"{'  ' * i}v{v['version']}{al} ← {v['parent']}: snapshot {v['data_snapshot_tag'] or '?'}, "
            f"new data {new} ({len(v['batches'])} batch(es) seen), {v['train_minutes'] or '?'} min of training, "
            f"gate {'PASS' if v['gate_passed'] == 'true' else 'FAIL' if v['gate_passed'] else '?'} "
            f"WER {wer(v['gate_candidate_wer'])} {vs}"
        )


@app.command("status")
def status_cmd(
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """One screen: registry aliases, the last run of each DAG, landing batches not ingested yet, storage."""
    from pipeline_tasks.services.status import collect, render

    cfg = _load(profile, overrides)
    st = collect(cfg)
    typer.echo(json.dumps(st, indent=2, sort_keys=True, default=str) if as_json else render(st))


@corpus_app.command("generate")
def corpus_generate(
    out: Annotated[Path, typer.Option(help="landing-zone folder; week N goes to OUT/week-NNN")],
    week: Annotated[int, typer.Option(help="week number (draws new sentences each week)")] = 1,
    utterances: Annotated[int, typer.Option(help="number of utterances")] = 400,
    seed: Annotated[int, typer.Option(help="random seed; same seed gives byte-identical output")] = 1234,
    jobs: Annotated[int, typer.Option(help="parallel synthesis threads (0 = all cores)")] = 0,
) -> None:
    """Synthesize one week of speech (espeak-ng + Festival, channel effects) into a landing zone (WAV + NeMo JSONL)."""
    from synth import corpus

    _setup_logging()
    from pipeline_tasks.config import CorpusConfig

    # the default profile's mix (synthesizer and condition shares, the per-week diversity ramp)
    res = corpus.generate_week(out, week=week, utterances=utterances, seed=seed, jobs=jobs,
                               mix=corpus.Mix.from_config(CorpusConfig()))
    typer.echo(json.dumps(res, indent=2, sort_keys=True))


@corpus_app.command("golden")
def corpus_golden(
    out: Annotated[Path, typer.Option(help="golden-set folder")],
    utterances: Annotated[int, typer.Option(help="number of utterances")] = 120,
    seed: Annotated[int, typer.Option(help="random seed")] = 1234,
    jobs: Annotated[int, typer.Option(help="parallel synthesis threads (0 = all cores)")] = 0,
) -> None:
    """Synthesize the fixed golden set from sentences and voices never used for training weeks."""
    from synth import corpus

    _setup_logging()
    res = corpus.generate_golden(out, utterances=utterances, seed=seed, jobs=jobs)
    typer.echo(json.dumps(res, indent=2, sort_keys=True))


@config_app.command("show")
def config_show(profile: ProfileOpt = "local", overrides: SetOpt = None) -> None:
    """Print the validated config with overrides applied and paths resolved (credentials masked)."""
    import yaml

    from pipeline_tasks.config import redact_secrets

    cfg = _load(profile, overrides)
    typer.echo(yaml.safe_dump(redact_secrets(cfg.dump()), sort_keys=False))


# ---- asrflow landing import: existing data sets into the landing zone (pipeline_tasks/landing/) ----

landing_app = typer.Typer(no_args_is_help=True, help="Bring existing speech data sets into the landing zone.")
app.add_typer(landing_app, name="landing")


@landing_app.command("import")
def landing_import(
    src: Annotated[Path, typer.Argument(help="the data set: a folder (or, for lhotse, a manifest file)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="librispeech | commonvoice | kaldi | lhotse | audiofolder")],
    batch: Annotated[str, typer.Option(help="batch name: the batch is written to <landing>/<NAME>/")],
    landing: Annotated[str | None, typer.Option(help="landing folder (default: the profile's paths.landing_url)")] = None,
    profile: ProfileOpt = "local",
    overrides: SetOpt = None,
    copy: Annotated[
        bool, typer.Option("--copy/--link", help="copy whole audio files, or hard-link them (in place when SRC is in the landing zone)")
    ] = True,
    split: Annotated[str, typer.Option(help="commonvoice: the split TSV to read")] = "validated",
    text_column: Annotated[str | None, typer.Option(help="audiofolder: the transcript column")] = None,
    speaker_column: Annotated[str | None, typer.Option(help="audiofolder: the speaker column")] = None,
    id_prefix: Annotated[str, typer.Option(help="prepended to every id (ids are unique across all batches)")] = "",
    speaker_prefix: Annotated[str, typer.Option(help="prepended to every speaker")] = "",
    jobs: Annotated[int, typer.Option(help="threads probing and writing audio (0 = all cores)")] = 0,
) -> None:
    """Import a data set as one landing batch: manifest.jsonl + audio + import_report.json (rejected entries)."""
    from pipeline_tasks.landing import LandingImportError, import_batch

    _setup_logging()
    cfg = _load(profile, overrides)
    try:
        res = import_batch(
            fmt,
            src,
            batch,
            landing if landing is not None else cfg.paths.landing_url,
            mode="copy" if copy else "link",
            jobs=jobs,
            split=split,
            text_column=text_column,
            speaker_column=speaker_column,
            id_prefix=id_prefix,
            speaker_prefix=speaker_prefix,
            manifest_glob=cfg.ingest.manifest_glob,
        )
    except LandingImportError as e:
        typer.echo(f"error ({type(e).__name__}): {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(json.dumps(res, indent=2, sort_keys=True))
    verb = "already imported, nothing written:" if res["status"] == "unchanged" else "imported"
    reasons = ", ".join(f"{k} {v}" for k, v in res["rejected_reasons"].items())
    detail = f" ({reasons}; see {res['report']})" if reasons else ""
    typer.echo(
        f"{verb} {res['n_imported']} of {res['n_entries']} entries into {res['batch_dir']}; "
        f"{res['n_rejected']} rejected{detail}",
        err=True,
    )
    for note in res["notes"]:
        typer.echo(f"note: {note}", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
