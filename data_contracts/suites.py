"""The data contracts as code: Great Expectations (1.x) suites for ingested utterances.

What: two suites, built from plain limits (:class:`ContractLimits`) so this package does not
depend on the pipeline's config:

* ``utterance_rows`` — one verdict per utterance. Each expectation carries a ``meta.reason``
  (the quarantine reason for a row that breaks it) and a ``meta.description``:
  decodable (the stored FLAC's header frame count equals ``num_samples``), stored sample rate
  and declared sample rate 16 kHz, duration within ``[min_duration_s, max_duration_s]``,
  non-empty normalized text, only allowed characters, a plausible characters-per-second ratio
  (catches a transcript that belongs to other audio), unique id, unique audio (the same audio under
  two ids would land in both train and dev: the split hashes ids), well-formed content hash.
* ``utterance_batch`` — one verdict per landing batch (e.g. ``week-001``) on a per-batch
  frame that holds every landing row of the batch, accepted or quarantined: at least
  ``min_utterances`` accepted, median duration of accepted rows within range, share of
  quarantined rows at most ``max_quarantine_share``, no speaker holding more than
  ``max_hours_per_speaker_share`` of the batch's hours.

:class:`ContractRunner` runs them in an *ephemeral* GX context (nothing written to a GX
project folder) with a pandas datasource, a ``ValidationDefinition`` per suite and a
``Checkpoint`` (which stores each result in the context's in-memory results store);
:meth:`ContractRunner.build_docs` then renders GX's own Data Docs site (HTML) from those results
into a folder the caller chooses. Row failures are mapped back to ids through ``unexpected_index_list``
(``result_format=COMPLETE``, ``unexpected_index_column_names=["id"]``).

Why: the contract is versioned with the code (bump :data:`SUITES_VERSION` when it changes;
the validate step's key includes it), readable by people (Data Docs), and machine-actionable
(row → reason → quarantine; batch failure → :class:`DataContractError`).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

SUITES_VERSION = "2"  # 2: unique audio_hash (duplicate_audio)
ROW_SUITE = "utterance_rows"
BATCH_SUITE = "utterance_batch"


class DataContractError(RuntimeError):
    """A batch broke a batch-level expectation. ``failures`` lists them; the message is readable."""

    def __init__(self, message: str, failures: list[dict[str, Any]] | None = None, report: str | None = None):
        super().__init__(message)
        self.failures = failures or []
        self.report = report


@dataclass(frozen=True)
class ContractLimits:
    """Plain numbers the suites are built from (validate maps its config onto these)."""

    sample_rate: int = 16000
    min_duration_s: float = 0.3
    max_duration_s: float = 600.0
    min_chars_per_s: float = 2.0
    max_chars_per_s: float = 30.0
    allowed_chars: str = "abcdefghijklmnopqrstuvwxyz' "
    max_quarantine_share: float = 0.2
    min_utterances: int = 1
    median_duration_s: tuple[float, float] = (0.5, 30.0)
    max_hours_per_speaker_share: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def allowed_regex(allowed_chars: str) -> str:
    """An anchored regex matching strings made only of ``allowed_chars`` (at least one)."""
    body = "".join("\\s" if c == " " else re.escape(c) for c in sorted(set(allowed_chars)))
    return f"^[{body}]+$"


def _gx():
    import great_expectations as gx

    return gx


def row_expectations(lim: ContractLimits) -> list[Any]:
    """The row-level expectations, in the order their reasons take precedence."""
    E = _gx().expectations
    return [
        E.ExpectColumnValuesToNotBeNull(
            column="audio_frames",
            meta={"reason": "audio_not_decodable", "description": "the stored FLAC exists and its header is readable"},
        ),
        E.ExpectColumnPairValuesToBeEqual(
            column_A="audio_frames",
            column_B="num_samples",
            meta={"reason": "audio_not_decodable", "description": "stored FLAC frame count equals num_samples"},
        ),
        E.ExpectColumnValuesToBeInSet(
            column="audio_sample_rate",
            value_set=[lim.sample_rate],
            meta={"reason": "bad_sample_rate", "description": f"stored FLAC is {lim.sample_rate} Hz"},
        ),
        E.ExpectColumnValuesToBeInSet(
            column="sample_rate",
            value_set=[lim.sample_rate],
            meta={"reason": "bad_sample_rate", "description": f"manifest sample_rate is {lim.sample_rate}"},
        ),
        E.ExpectColumnValuesToBeBetween(
            column="duration_s",
            min_value=lim.min_duration_s,
            max_value=lim.max_duration_s,
            meta={
                "reason": "duration_out_of_bounds",
                "description": f"duration within [{lim.min_duration_s}, {lim.max_duration_s}] s",
            },
        ),
        E.ExpectColumnValueLengthsToBeBetween(
            column="text",
            min_value=1,
            meta={"reason": "empty_text", "description": "normalized text is not empty"},
        ),
        E.ExpectColumnValuesToMatchRegex(
            column="text",
            regex=allowed_regex(lim.allowed_chars),
            meta={"reason": "disallowed_chars", "description": f"text uses only {lim.allowed_chars!r}"},
        ),
        E.ExpectColumnValuesToBeBetween(
            column="chars_per_s",
            min_value=lim.min_chars_per_s,
            max_value=lim.max_chars_per_s,
            meta={
                "reason": "text_audio_mismatch",
                "description": f"characters per second within [{lim.min_chars_per_s}, {lim.max_chars_per_s}]",
            },
        ),
        E.ExpectColumnValuesToBeUnique(
            column="id", meta={"reason": "duplicate_id", "description": "utterance ids are unique"}
        ),
        E.ExpectColumnValuesToBeUnique(
            column="audio_hash",
            meta={
                "reason": "duplicate_audio",
                "description": "each audio appears once (the same audio under two ids would reach train and dev)",
            },
        ),
        E.ExpectColumnValuesToMatchRegex(
            column="audio_hash",
            regex="^[0-9a-f]{64}$",
            meta={"reason": "bad_audio_hash", "description": "audio_hash is a sha256 hex digest"},
        ),
    ]


def _row_condition_accepted():
    from great_expectations.expectations.row_conditions import Column

    return Column("accepted") == 1


def batch_expectations(lim: ContractLimits) -> list[Any]:
    """Batch-level expectations over :func:`batch_frame` (one row per landing row of a batch)."""
    E = _gx().expectations
    lo, hi = lim.median_duration_s
    return [
        E.ExpectColumnSumToBeBetween(
            column="accepted",
            min_value=lim.min_utterances,
            meta={"description": f"at least {lim.min_utterances} accepted utterance(s)"},
        ),
        E.ExpectColumnMedianToBeBetween(
            column="duration_s",
            min_value=lo,
            max_value=hi,
            row_condition=_row_condition_accepted(),
            meta={"description": f"median duration of accepted rows within [{lo}, {hi}] s"},
        ),
        E.ExpectColumnMeanToBeBetween(
            column="quarantined",
            max_value=lim.max_quarantine_share,
            meta={"description": f"share of quarantined rows at most {lim.max_quarantine_share}"},
        ),
        E.ExpectColumnMaxToBeBetween(
            column="speaker_hours_share",
            max_value=lim.max_hours_per_speaker_share,
            meta={"description": f"no speaker above {lim.max_hours_per_speaker_share} of the batch's hours"},
        ),
    ]


def build_suite(name: str, expectations: list[Any]):
    """An ``ExpectationSuite`` holding ``expectations`` (with the contract version in its meta)."""
    gx = _gx()
    suite = gx.ExpectationSuite(name=name, meta={"asrflow.suites_version": SUITES_VERSION})
    for e in expectations:
        suite.add_expectation(e)
    return suite


# ---------------------------------------------------------------------------------
# frames the suites run on
# ---------------------------------------------------------------------------------


def batch_frame(accepted: pd.DataFrame, n_quarantined: int) -> pd.DataFrame:
    """One row per landing row of a batch: accepted rows (with duration and their speaker's
    hours share) followed by ``n_quarantined`` quarantined rows (no duration)."""
    acc = accepted[["duration_s", "speaker"]].copy()
    total = float(acc["duration_s"].sum())
    spk = acc["speaker"].fillna("<unknown>")
    shares = acc.groupby(spk)["duration_s"].transform("sum") / total if total > 0 else acc["duration_s"] * 0.0
    # utterances with no speaker are not one speaker: they do not count towards a share
    shares = shares.where(acc["speaker"].notna(), 0.0)
    frame = pd.DataFrame(
        {
            "duration_s": acc["duration_s"].astype(float).to_numpy(),
            "accepted": 1,
            "quarantined": 0,
            "speaker_hours_share": shares.astype(float).to_numpy(),
        }
    )
    if n_quarantined:
        q = pd.DataFrame(
            {
                "duration_s": [float("nan")] * n_quarantined,
                "accepted": 0,
                "quarantined": 1,
                "speaker_hours_share": 0.0,
            }
        )
        frame = pd.concat([frame, q], ignore_index=True)
    frame["accepted"] = frame["accepted"].astype(int)
    frame["quarantined"] = frame["quarantined"].astype(int)
    return frame


# ---------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and v != v:
        return None
    return v


class ContractRunner:
    """Runs the suites in one ephemeral GX context and renders Data Docs into ``docs_dir``."""

    def __init__(self, limits: ContractLimits, docs_dir: str | Path | None = None):
        gx = _gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.limits = limits
        gx_log = logging.getLogger("great_expectations")
        if gx_log.level == logging.NOTSET:  # its INFO lines (datasource loading...) drown the step's own log
            gx_log.setLevel(logging.WARNING)
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = Path(docs_dir) if docs_dir else None
        self._site = "asrflow"
        # the ephemeral context makes a default docs site in a fresh temp folder: drop both
        for site, conf in dict(self.ctx.variables.data_docs_sites or {}).items():
            base = (conf.get("store_backend") or {}).get("base_directory")
            self.ctx.delete_data_docs_site(site)
            if base and Path(base).is_dir() and Path(base).name.startswith("tmp") and not any(Path(base).iterdir()):
                Path(base).rmdir()
        if self.docs_dir:
            self.ctx.add_data_docs_site(
                site_name=self._site,
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(self.docs_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        self.ds = self.ctx.data_sources.add_pandas("asrflow")
        self.row_suite = self.ctx.suites.add(build_suite(ROW_SUITE, row_expectations(limits)))
        self.batch_suite = self.ctx.suites.add(build_suite(BATCH_SUITE, batch_expectations(limits)))

    def _run(self, suite, asset_name: str, df: pd.DataFrame, result_format: dict[str, Any]):
        gx = _gx()
        existing = {a.name for a in self.ds.assets}
        name, n = asset_name, 1
        while name in existing:  # the same runner may validate the same batch name twice
            n += 1
            name = f"{asset_name}-{n}"
        asset = self.ds.add_dataframe_asset(name)
        bd = asset.add_batch_definition_whole_dataframe(f"{name}-all")
        vd = self.ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}-{uuid.uuid4().hex[:8]}", data=bd, suite=suite)
        )
        # no per-run docs action: the site is rendered once, by build_docs(), from the stored results
        cp = self.ctx.checkpoints.add(
            gx.Checkpoint(name=f"cp-{vd.name}", validation_definitions=[vd], actions=[], result_format=result_format)
        )
        res = cp.run(batch_parameters={"dataframe": df})
        return next(iter(res.run_results.values()))

    def validate_rows(self, df: pd.DataFrame, asset_name: str = "utterances") -> tuple[dict[str, list[dict]], Any]:
        """Run the row suite; returns ``{id: [{reason, description, value}, ...]}`` for failing rows and the GX result."""
        res = self._run(
            self.row_suite,
            asset_name,
            df,
            {"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]},
        )
        failures: dict[str, list[dict]] = {}
        for r in res.results:
            if r.success:
                continue
            meta = r.expectation_config.meta or {}
            reason = meta.get("reason", r.expectation_config.type)
            idx = r.result.get("unexpected_index_list")
            if idx is None:
                # an expectation that could not run (e.g. a column missing) fails the whole table
                err = (r.exception_info or {}).get("exception_message") if isinstance(r.exception_info, dict) else None
                raise DataContractError(f"row expectation {r.expectation_config.type} could not run: {err or r.result}")
            values = r.result.get("unexpected_list") or [None] * len(idx)
            for item, value in zip(idx, values, strict=False):
                rid = item["id"] if isinstance(item, dict) else item
                failures.setdefault(str(rid), []).append(
                    {"reason": reason, "description": meta.get("description", ""), "value": _jsonable(value)}
                )
        return failures, res

    def validate_batch(self, frame: pd.DataFrame, batch: str) -> tuple[list[dict[str, Any]], Any]:
        """Run the batch suite on one batch's frame; returns the failing expectations (with observed values)."""
        asset = "batch-" + re.sub(r"[^A-Za-z0-9_-]", "_", batch)
        res = self._run(self.batch_suite, asset, frame, {"result_format": "SUMMARY"})
        failures = []
        for r in res.results:
            if r.success:
                continue
            kw = r.expectation_config.kwargs
            failures.append(
                {
                    "batch": batch,
                    "expectation": r.expectation_config.type,
                    "description": (r.expectation_config.meta or {}).get("description", ""),
                    "observed": _jsonable(r.result.get("observed_value")),
                    "min_value": _jsonable(kw.get("min_value")),
                    "max_value": _jsonable(kw.get("max_value")),
                }
            )
        return failures, res

    def build_docs(self) -> Path | None:
        """Render the GX Data Docs site (every validation run so far) into ``docs_dir``; its index.html."""
        if not self.docs_dir:
            return None
        self.ctx.build_data_docs(site_names=[self._site])
        return self.docs_dir / "index.html"


def format_failures(failures: list[dict[str, Any]]) -> str:
    """A short readable list: ``week-001: median duration ... — observed 0.31 (allowed [0.5, 30.0])``."""
    lines = []
    for f in failures:
        obs = f["observed"]
        obs_s = f"{obs:.4g}" if isinstance(obs, float) else str(obs)
        lines.append(
            f"  - {f['batch']}: {f['description'] or f['expectation']} — observed {obs_s} "
            f"(allowed [{f['min_value'] if f['min_value'] is not None else '-inf'}, "
            f"{f['max_value'] if f['max_value'] is not None else 'inf'}])"
        )
    return "\n".join(lines)
