"""``onelayer claims``: the study's claims table from a main scan and whatever else has been run.

Reads the main scan (profile, learning-rate grid, parameter changes, out-of-domain evaluations), scans of other
tasks (rank correlations), an ``onelayer compare`` directory (strategies against full training) and an
``onelayer ensemble`` directory (specialists against self-consistency), and writes ``claims.md`` (one table,
claim by claim, then the verdict rules) and ``claims.json``. A claim whose runs are missing gets a row saying
which command makes them, so the table can be written at any stage of a reproduction and filled in later.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..analysis.claims import (
    CORRELATION_RULE,
    ENSEMBLE_RULE,
    INCONCLUSIVE,
    STRATEGY_RULE,
    Claim,
    best_layer_claim,
    correlation_claim,
    depth_claim,
    ensemble_claim,
    leverage_claim,
    missing,
    rate_claim,
    strategy_claim,
)
from ..analysis.contribution import bootstrap_indices, gain_estimate
from ..analysis.document import Section, Table, to_markdown
from ..analysis.rank import compare_profiles
from ..errors import OneLayerError
from ..jsonl import exists, read_jsonl
from ..profile import Estimate, Profile, read_profile, reference_path, reference_suffix

# the study's numbers the claims are checked against (arXiv:2607.01232, as quoted in the reproduction issue)
STUDY_MATH_MATH, STUDY_MATH_CODE, STUDY_OOD = 0.76, 0.59, 0.6
STUDY_POINTS = {"top:10": 2.7, "middle": 1.76}  # gains over full training, accuracy points
CLAIMED = ("top:", "middle:", "lr-guided")  # strategies the study says beat full training


def _is_scan(path: Path) -> bool:
    return (path / "scan.json").is_file()


def _strategy_points(label: str) -> float | None:
    from .compare import strategy_term  # as strategy_claims below: reading claims needs no comparison code

    label = strategy_term(label)
    return STUDY_POINTS.get(label, STUDY_POINTS["middle"] if label.startswith("middle:") else None)


def correlation_claims(profile: Profile, others: Sequence[str], claim: str, study_value: float,
                       make: str) -> list[Claim]:
    """One rank-correlation row of the main ``profile`` with each other scan's (or one 'not measured' row saying
    how to make one)."""
    if not others:
        return [missing(claim, f"Spearman {study_value:.2f}", "Spearman's rho of the two profiles", CORRELATION_RULE,
                        make)]
    rows = []
    for other in others:
        theirs = read_profile(other)
        notes = [f"{name}: {p.warning}" for name, p in (("main scan", profile), (str(other), theirs)) if not p.reliable]
        rows.append(correlation_claim(claim, study_value, compare_profiles(profile, theirs), "; ".join(notes),
                                      str(other), not notes))
    return rows


def ood_claims(main: str, in_domain: Profile | None, results: list | None = None) -> list[Claim]:
    """One row per out-of-domain task the main scan was evaluated on: its profile (at the rate the scan's study
    profile reads) against ``in_domain``, the main profile as given (with its query). ``results``: the scan's
    :func:`onelayer.experiments.ood.ood_results`, where the caller has them already."""
    from .ood import ood_results

    claim, study, measure = ("layer rankings hold out of domain", "Spearman > 0.6",
                             "Spearman's rho, in-domain vs out-of-domain profile")
    scan_dir = reference_path(main)
    if not _is_scan(scan_dir):
        return [missing(claim, study, measure, CORRELATION_RULE, f"{main} is not a scan directory: pass the scan")]
    results = ood_results(scan_dir) if results is None else results
    if not results:
        return [missing(claim, study, measure, CORRELATION_RULE, f"run onelayer analyze ood {scan_dir} --tasks TASK")]
    rows = []
    for r in results:
        reliable = in_domain.reliable and r.profile is not None and r.profile.reliable
        note = "; ".join(filter(None, [in_domain.warning and f"in domain: {in_domain.warning}", r.note]))
        correlation = compare_profiles(in_domain, r.profile) if r.profile is not None else None
        rows.append(correlation_claim(f"{claim} ({r.task})", STUDY_OOD, correlation, note,
                                      f"{main} (ood {r.slug})", reliable, study))
    return rows


def parameter_claim(main: str, profile: Profile) -> Claim:
    from .scan import param_change

    scan_dir = reference_path(main)
    if not _is_scan(scan_dir):
        return leverage_claim(None, absent=f"{main} is not a scan directory: pass the scan")
    found = param_change(scan_dir, profile)
    if found is None:
        return leverage_claim(None)
    return leverage_claim(found[3], main, profile.reliable)


STRATEGIES_CLAIM = "top-k layers, contribution-scaled rates or the geometric middle beat full training"


def strategy_claims(compare: str | None) -> list[Claim]:
    from .compare import comparison_results

    study, measure = "top-10 +2.7 points, middle +1.76", "accuracy gain over full training"
    if not compare:
        return [missing(STRATEGIES_CLAIM, study, measure, STRATEGY_RULE,
                        "run onelayer compare SCAN --strategies full,top:10,lr-guided,middle:10 --seeds 2")]
    results = comparison_results(compare)
    if results.full_gain is None:
        return [missing(STRATEGIES_CLAIM, study, measure, STRATEGY_RULE,
                        f"{compare} has no finished full-training run: rerun onelayer compare to finish it")]
    rows = [strategy_claim(s.label, Estimate(s.gain_over_full, s.gain_low, s.gain_high), len(s.seeds),
                           _strategy_points(s.label), compare)
            for s in results.strategies if s.label.startswith(CLAIMED)]
    if not rows:
        return [missing(STRATEGIES_CLAIM, study, measure, STRATEGY_RULE,
                        f"{compare} has no finished top:k, middle:k or lr-guided strategy: rerun onelayer compare "
                        "with them")]
    return rows


def _correct(path: Path) -> tuple[np.ndarray, int]:
    """Per-example correctness of a vote file and how many answers each vote pooled."""
    rows = read_jsonl(path, missing_ok=False)
    if not rows:
        raise OneLayerError(f"{path} holds no examples: rerun onelayer ensemble")
    try:
        return np.asarray([float(r["correct"]) for r in rows]), len(rows[0]["answers"])
    except (KeyError, TypeError) as err:
        raise OneLayerError(f"{path} is not an onelayer ensemble file (a line lacks {err}): rerun onelayer "
                            "ensemble") from None


def ensemble_claims(ensemble: str | None, self_consistency: str | None = None) -> list[Claim]:
    """The specialists' vote (``ensemble``: an onelayer ensemble --out) against self-consistency (in the same
    directory, or in ``self_consistency``). Examples are paired by their order in the two files (both are
    written in the eval split's order)."""
    claim = "a majority vote of layer specialists beats self-consistency"
    if self_consistency and not ensemble:
        raise OneLayerError("--self-consistency compares with the specialists' vote: pass --ensemble DIR too")
    if not ensemble:
        return [missing(claim, "33.6 vs 31.3 (+2.3 points)", "vote accuracy minus self-consistency's", ENSEMBLE_RULE,
                        "run onelayer ensemble RUN1 ... RUN7 --self-consistency BEST_RUN --k 7 --out DIR")]
    folder = Path(ensemble)
    files = {"ensemble": folder / "ensemble.examples.jsonl",
             "self_consistency": Path(self_consistency or folder) / "self_consistency.examples.jsonl"}
    absent = [str(f) for f in files.values() if not exists(f)]
    if absent:
        raise OneLayerError(f"{absent[0]} does not exist: pass the --out of onelayer ensemble RUNS ... (and of "
                            "onelayer ensemble --self-consistency RUN --k K, with --self-consistency DIR where it "
                            "is another directory)")
    (votes, k), (samples, k_sc) = _correct(files["ensemble"]), _correct(files["self_consistency"])
    if votes.size != samples.size:
        raise OneLayerError(f"{folder}: the vote covers {votes.size} examples and self-consistency {samples.size}: "
                            "run both on the same --n")
    gain = gain_estimate(samples, votes, bootstrap_indices(votes.size, 2000, 0))
    summary = json.loads((folder / "ensemble.json").read_text()) if (folder / "ensemble.json").is_file() else {}
    best, accuracy = summary.get("best_member"), summary.get("member_accuracy") or {}
    single = f"best single specialist {best} {accuracy[best]:.3f}" if best in accuracy else ""
    member = read_jsonl(folder / "members" / str(best) / "eval.examples.jsonl") if single else []
    if len(member) == votes.size:  # the stricter comparison: does the vote beat its own best member?
        over = gain_estimate(np.asarray([float(r["correct"][0]) for r in member]), votes,
                             bootstrap_indices(votes.size, 2000, 1))
        single += (f" (the vote minus it: {over.value * 100:+.2f} points [{over.low * 100:+.2f}, "
                   f"{over.high * 100:+.2f}])")
    sc_summary = Path(self_consistency or folder) / "self_consistency.json"
    temperature = json.loads(sc_summary.read_text()).get("temperature") if sc_summary.is_file() else None
    if temperature is not None:
        single = "; ".join(filter(None, [single, f"self-consistency sampled at temperature {temperature:g}"]))
    source = str(folder) + (f" vs {self_consistency}" if self_consistency else "")
    row = ensemble_claim(gain, float(votes.mean()), float(samples.mean()), k, single, source)
    if k != k_sc:  # not like for like: say so, and claim nothing
        row = replace(row, verdict=INCONCLUSIVE, why=f"{row.why}; {k} specialists against {k_sc} samples: not the same k")
    return [row]


def study_claims(main: str, math: Sequence[str] = (), code: Sequence[str] = (), compare: str | None = None,
                 ensemble: str | None = None, self_consistency: str | None = None,
                 ood: list | None = None, ood_scan: str | None = None) -> list[Claim]:
    """Every claim of the study, from ``main`` (a scan directory or profile reference, e.g. ``scans/main`` or
    ``scans/main?protocol=best``) and the optional other measurements; ``ood``: the scan's out-of-domain results
    where the caller has them already (the report); ``ood_scan``: another scan that was evaluated out of domain
    (its checkpoints are needed, so it may be a smaller scan trained for it), read against its own in-domain
    profile (the reference's, e.g. its study protocol)."""
    profile = read_profile(main)
    if ood_scan:  # its profiles out of domain are read at its study protocol's rate: so is its own in domain
        ood_rows = ood_claims(str(ood_scan), read_profile(ood_scan) if _is_scan(reference_path(ood_scan)) else None)
    else:
        ood_rows = ood_claims(main, profile, ood)
    return [
        *(replace(c, source=str(main)) for c in (depth_claim(profile), best_layer_claim(profile), rate_claim(profile))),
        *correlation_claims(profile, math, "layer rankings correlate across math datasets", STUDY_MATH_MATH,
                            "scan a second math task and pass it with --math SCAN"),
        *correlation_claims(profile, code, "layer rankings correlate between math and code", STUDY_MATH_CODE,
                            "scan a code task (e.g. code:synth) and pass it with --code SCAN"),
        *ood_rows, parameter_claim(main, profile), *strategy_claims(compare),
        *ensemble_claims(ensemble, self_consistency),
    ]


def _ours(c: Claim) -> str:
    if c.ours:
        return c.ours
    e = c.estimate
    if e is None:
        return "n/a"
    scale, unit, digits = (100, " points", 2) if c.unit == "points" else (1, "", 3)
    return f"{e.value * scale:+.{digits}f}{unit} [{e.low * scale:+.{digits}f}, {e.high * scale:+.{digits}f}]"


def _finite(value):
    """NaN and infinities as null, so that claims.json is strict JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def default_out(main: str) -> Path:
    """``SCAN/claims``, or ``SCAN/claims-protocol-best`` and so on for a profile query (each its own table); beside
    a profile file, ``claims``."""
    path = reference_path(main)
    folder = path if path.is_dir() else path.parent
    return folder / ("claims" + reference_suffix(main))


HEADER = ["#", "claim", "study", "ours (95% interval)", "verdict", "why", "rule", "from"]
VERDICT_NOTE = ("Verdicts come from the interval, not the point: reproduced when it lies wholly where the claim says, "
                "not reproduced when wholly where it is false, inconclusive when it straddles.")


def claim_table(claims: list[Claim]) -> tuple[list[list[str]], list[str]]:
    """The table's rows (cells as in :data:`HEADER`) and the distinct rules they cite (R1 is the first)."""
    rules = list(dict.fromkeys(c.rule for c in claims))
    rows = [[str(i), c.claim, c.study or "-", _ours(c), c.verdict, c.why, f"R{rules.index(c.rule) + 1}",
             c.source or "-"] for i, c in enumerate(claims, 1)]
    return rows, rules


def claims_section(claims: list[Claim]) -> Section:
    """The claims as a report section (``onelayer report`` adds it to a scan's report)."""
    rows, rules = claim_table(claims)
    return Section("The study's claims", [Table(HEADER, rows), VERDICT_NOTE,
                                          *(f"R{i}: {rule}." for i, rule in enumerate(rules, 1))],
                   {"claims": [_finite(asdict(c)) for c in claims]})


def write_claims(claims: list[Claim], out: str | Path, title: str = "The study's claims, checked") -> Path:
    """``claims.md`` (the table, the verdict rule and each distinct rule once) and ``claims.json`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    section = claims_section(claims)
    md = out / "claims.md"
    md.write_text(to_markdown(title, [section], out))
    (out / "claims.json").write_text(json.dumps(section.data["claims"], indent=2, allow_nan=False))
    return md
