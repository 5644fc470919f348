"""`lorasync bench verdict`'s report: the table people read, with the machine, date, commit and
command the numbers came from (`verdict.py` measures)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def summarize(case, measures: list[dict]) -> dict:
    """One row: the case's worst statistics over its verdicts, and whether the verdict is right."""
    weights = [m["weights"] for m in measures]
    logprobs = [m["logprob"] for m in measures]
    first = next((w["first_mismatch"] for w in weights if w["first_mismatch"]), None)
    caches = [m["cache"] for m in measures if "cache" in m]  # the generation cases'
    weight_fails = sum(not w["ok"] for w in weights)
    logprob_fails = sum(not lp["ok"] for lp in logprobs)
    cache_fails = sum(not c["ok"] for c in caches)
    caught_by = [level for level, fails in (("weights", weight_fails), ("logprobs", logprob_fails),
                                            ("cache", cache_fails)) if fails]
    if case.expected == "correct":
        right = not caught_by
    else:
        right = bool(caught_by)
    return {
        "case": case.name,
        "expected": case.expected,
        "note": case.note,
        "verdicts": len(measures),
        "weights": {
            "ok": len(weights) - weight_fails,
            "tensors": weights[-1]["tensors"],
            "mismatches": max(w["mismatches"] for w in weights),
            "first_mismatch": first,
            "max_abs_diff": max(w["max_abs_diff"] for w in weights),
            "exact": weights[-1]["exact"],
            "unread": weights[-1]["unread"],
        },
        "logprob": {
            "ok": len(logprobs) - logprob_fails,
            **{key: max(lp[key] for lp in logprobs) for key in (
                "mean_abs_diff", "quantile_abs_diff", "max_abs_diff", "mean_ratio", "quantile_ratio", "max_ratio")},
        },
        "cache": {"ok": len(caches) - cache_fails, "checks": len(caches),
                  "mean_abs_diff": max(c["mean_abs_diff"] for c in caches),
                  "quantile_abs_diff": max(c["quantile_abs_diff"] for c in caches)} if caches else None,
        "false_alarms": {"weights": weight_fails, "logprobs": logprob_fails, "cache": cache_fails}
        if case.expected == "correct" else None,
        "caught_by": caught_by if case.expected == "broken" else None,
        "right": right,
        "per_verdict": measures,
    }


def git_commit() -> str:
    """The commit of the checkout this package runs from, "+dirty" with uncommitted changes to
    tracked files; "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# ---- the table


def _lp(value: float, ratio: float) -> str:
    return f"{value:9.3g} ({ratio:.3g}x)"


def _cache(cache: dict | None) -> str:
    if cache is None:
        return f"{'-':>10} {'-':>5}"
    return f"{cache['mean_abs_diff']:>10.3g} {cache['ok']:>2}/{cache['checks']:<2}"


def _verdict(row: dict) -> str:
    n = row["verdicts"]
    if row["expected"] == "correct":
        alarms = row["false_alarms"]
        if row["right"]:
            levels = "all three levels" if row["cache"] else "both levels"
            return f"right: passed {levels} ({n}/{n})"
        return (f"WRONG: false alarms at weights {alarms['weights']}/{n}, "
                f"logprobs {alarms['logprobs']}/{n}, cache {alarms['cache']}/{n}")
    if row["right"]:
        return "right: caught by " + " and ".join(row["caught_by"])
    return "WRONG: missed by every level"


def format_table(result: dict) -> str:
    m, c, floor, bounds = result["machine"], result["config"], result["floor"], result["bounds"]
    q = f"p{100 * bounds['level']:g}"
    lines = [
        f"lorasync bench verdict, {result['date']}",
        f"command: {result['command']}",
        f"commit: {result['commit']}",
        f"machine: {m['cpu_model']}, torch ISA {m['cpu_capability']} "
        f"({' '.join(m['isa_flags']) or 'no AVX2'}{', capped ' + str(m['isa_caps']) if m['isa_caps'] else ''}), "
        f"{m['torch_threads']} threads, torch {m['torch']}",
        f"engine: colocated, {c['dtype']}; {Path(c['model']).name}, LoRA r={c['rank']} all-linear (alpha 2r); "
        f"a step between syncs: N(0, {result['step_std']:g}) on every factor",
        f"floor (version 0, adapter disabled; {result['probes']['sequences']} sequences, "
        f"{floor['tokens']} tokens): mean {floor['mean_abs_diff']:.3g}, {q} {floor['quantile_abs_diff']:.3g}, "
        f"max {floor['max_abs_diff']:.3g}",
        f"cache floor (version 0, the engine's sampling logprobs against its scoring, prompts "
        f"cached): mean {result['cache_floor']['mean_abs_diff']:.3g}, max {result['cache_floor']['max_abs_diff']:.3g}",
        f"logprob bounds: mean <= {bounds['mean_factor']:g} x floor + {result['tolerance'] / 10:g} = "
        f"{bounds['mean']:.3g}; {q} <= {bounds['quantile_factor']:g} x floor + {result['tolerance'] / 10:g} = "
        f"{bounds['quantile']:.3g}; max not judged",
        "",
        f"{'case':<26} {'expected':<8} {'n':>3} | {'weights ok':>10} {'tensors':>7} {'mism.':>5} "
        f"{'first mismatch':<40} {'largest diff':>12} | {'logprob mean (/floor)':>21} {q + ' (/floor)':>21} "
        f"{'max (/floor)':>21} {'ok':>5} | {'cache mean':>10} {'ok':>5} | verdict",
    ]
    for row in result["cases"]:
        w, lp, n = row["weights"], row["logprob"], row["verdicts"]
        lines.append(
            f"{row['case']:<26} {row['expected']:<8} {n:>3} | {w['ok']:>4}/{n:<2} {'=' if w['exact'] else '~':>3} "
            f"{w['tensors']:>7} {w['mismatches']:>5} {w['first_mismatch'] or '-':<40} {w['max_abs_diff']:>12.3g} | "
            f"{_lp(lp['mean_abs_diff'], lp['mean_ratio']):>21} "
            f"{_lp(lp['quantile_abs_diff'], lp['quantile_ratio']):>21} "
            f"{_lp(lp['max_abs_diff'], lp['max_ratio']):>21} {lp['ok']:>2}/{n:<2} | {_cache(row['cache'])} | {_verdict(row)}"
        )
    lines += [
        "",
        "weights ok: verdicts with no tensor out of bound (= bit for bit, ~ within the merge's rounding); "
        "mism., largest diff and the logprob statistics: the worst over the case's verdicts",
        *(f"{row['case']}: {row['note']}" for row in result["cases"]),
        "every verdict right" if result["all_right"] else "SOME VERDICTS WRONG (see the verdict column)",
    ]
    return "\n".join(lines)
