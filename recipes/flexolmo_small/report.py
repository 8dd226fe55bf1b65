"""The reproduction's table, opt-out report and target checks, from per-row BPB numbers (no model code here)."""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE = "FlexOlmo top-all"


def opt_out_report(rows: dict[str, dict], domains: tuple[str, ...], reference: str = REFERENCE,
                   prefix: str = "opt-out") -> dict:
    """For each removed expert: BPB change on every domain, and how far its own domain moved back to the anchor.

    recovery = (bpb_optout - bpb_merged) / (bpb_anchor - bpb_merged) on the removed domain: 1.0 means it is
    exactly as good as the anchor again (all of the expert's contribution taken back), 0.0 means unchanged.
    """
    merged, anchor = rows[reference]["bpb"], rows["anchor"]["bpb"]
    out = {}
    for d in domains:
        opt = rows[f"{prefix}: -{d}"]["bpb"]
        gain = anchor[d] - merged[d]
        out[d] = {
            "recovery": (opt[d] - merged[d]) / gain if gain > 0 else None,
            "delta": {x: opt[x] - merged[x] for x in opt},
            "relative_delta_other": {x: (opt[x] - merged[x]) / merged[x] for x in opt if x != d},
        }
    return out


def check_targets(rows: dict[str, dict], report: dict, domains: tuple[str, ...]) -> list[tuple[str, bool, str]]:
    """The issue's targets as (statement, met, evidence)."""
    m = rows[REFERENCE]
    checks = []
    for d in domains:
        a, e = rows["anchor"]["bpb"][d], rows[f"expert alone: {d}"]["bpb"][d]
        checks.append((f"merged beats anchor on {d}", m["bpb"][d] < a, f"{m['bpb'][d]:.4f} vs {a:.4f}"))
        checks.append((f"merged within 3% of the {d} expert on {d}", m["bpb"][d] <= 1.03 * e,
                       f"{m['bpb'][d]:.4f} vs {e:.4f} ({(m['bpb'][d] / e - 1) * 100:+.1f}%)"))
    for base in ("model soup", "random router rows", "no coordination"):
        checks.append((f"merged mean beats {base}", m["mean"] < rows[base]["mean"],
                       f"{m['mean']:.4f} vs {rows[base]['mean']:.4f}"))
    best_small_k = min(rows[k]["mean"] for k in ("FlexOlmo top-1", "FlexOlmo top-2") if k in rows)
    btm = rows["BTM ensemble (top-2)"]["mean"]
    checks.append(("merged (top-k <= 2) at least as good as BTM top-2 in mean", best_small_k <= btm,
                   f"{best_small_k:.4f} vs {btm:.4f}"))
    for d, r in report.items():
        rec = r["recovery"]
        checks.append((f"opt-out {d}: own domain moves >= 70% back to the anchor", rec is not None and rec >= 0.7,
                       "n/a" if rec is None else f"{rec * 100:.0f}%"))
        worst = max(abs(v) for v in r["relative_delta_other"].values())
        checks.append((f"opt-out {d}: every other domain moves <= 1%", worst <= 0.01, f"max {worst * 100:.2f}%"))
    return checks


def table_md(rows: dict[str, dict], columns: tuple[str, ...]) -> str:
    head = "| system | " + " | ".join(columns) + " | mean |\n|---|" + "---:|" * (len(columns) + 1) + "\n"
    best = {c: min(r["bpb"][c] for r in rows.values()) for c in columns}
    lines = []
    for name, r in rows.items():
        cells = [(f"**{r['bpb'][c]:.4f}**" if r["bpb"][c] == best[c] else f"{r['bpb'][c]:.4f}") for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['mean']:.4f} |")
    return head + "\n".join(lines) + "\n"


def write_results(out: Path, rows: dict[str, dict], report: dict, meta: dict, columns: tuple[str, ...]) -> None:
    domains = tuple(c for c in columns if c != "public")
    checks = check_targets(rows, report, domains)
    md = ["# FlexOlmo small-scale reproduction", "",
          f"Held-out bits per byte (lower is better) per domain; `public` is the anchor's own domain. "
          f"Device: {meta['device']}; torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}; "
          f"total wall {meta['timings_s']['total']:.0f}s.", "", table_md(rows, columns), "## Opt-out", "",
          "| removed | recovery on own domain | " + " | ".join(f"Δ {c}" for c in columns) + " |",
          "|---|---:|" + "---:|" * len(columns)]
    for d, r in report.items():
        rec = "n/a" if r["recovery"] is None else f"{r['recovery'] * 100:.0f}%"
        md.append(f"| {d} | {rec} | " + " | ".join(f"{r['delta'][c]:+.4f}" for c in columns) + " |")
    if "opt_out_after_router_tuning" in meta:
        md += ["", "After router tuning (reference: FlexOlmo + router tuning, top-all):", "",
               "| removed | recovery on own domain | " + " | ".join(f"Δ {c}" for c in columns) + " |",
               "|---|---:|" + "---:|" * len(columns)]
        for d, r in meta["opt_out_after_router_tuning"].items():
            rec = "n/a" if r["recovery"] is None else f"{r['recovery'] * 100:.0f}%"
            md.append(f"| {d} | {rec} | " + " | ".join(f"{r['delta'][c]:+.4f}" for c in columns) + " |")
    md += ["", "## Targets", "", "| target | met | evidence |", "|---|---|---|"]
    md += [f"| {s} | {'yes' if ok else '**no**'} | {ev} |" for s, ok, ev in checks]
    md += ["", "## Stage wall times (s)", "", " · ".join(f"{k} {v:.0f}" for k, v in meta["timings_s"].items()), ""]
    (out / "results.md").write_text("\n".join(md))
    slim = {k: {"bpb": v["bpb"], "mean": v["mean"]} for k, v in rows.items()}
    routing = {k: v["routing"] for k, v in rows.items() if v.get("routing") and k == REFERENCE}
    (out / "results.json").write_text(json.dumps({"rows": slim, "opt_out": report,
                                                  "targets": [{"target": s, "met": ok, "evidence": ev}
                                                              for s, ok, ev in checks],
                                                  "routing": routing, **meta}, indent=2) + "\n")
