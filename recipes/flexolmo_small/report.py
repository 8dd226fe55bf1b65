"""The reproduction's tables, routing summary, opt-out report and target checks, from per-row numbers (no model
code here). Row labels end in " (sN)" when they come from seed N; `seed_summary` folds those into mean ± std."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

_SEED = re.compile(r"^(.*) \(s(\d+)\)$")


def opt_out_report(rows: dict[str, dict], domains: tuple[str, ...], reference: str) -> dict:
    """For each removed expert: BPB change on every domain, and how far its own domain moved back to the anchor.

    recovery = (bpb_optout - bpb_merged) / (bpb_anchor - bpb_merged) on the removed domain: 1.0 means it is
    exactly as good as the anchor again (all of the expert's contribution taken back), 0.0 means unchanged.
    """
    merged, anchor = rows[reference]["bpb"], rows["anchor"]["bpb"]
    out = {}
    for d in domains:
        opt = rows[f"opt-out: -{d}"]["bpb"]
        gain = anchor[d] - merged[d]
        out[d] = {"recovery": (opt[d] - merged[d]) / gain if gain > 0 else None,
                  "delta": {x: opt[x] - merged[x] for x in opt},
                  "relative_delta_other": {x: (opt[x] - merged[x]) / merged[x] for x in opt if x not in (d, "mixed")}}
    return out


def seed_summary(rows: dict[str, dict]) -> dict[str, dict]:
    """{label without seed: {"seeds": n, "bpb": {col: (mean, std)}, "mean": (mean, std)}} for rows with seeds."""
    groups: dict[str, list[dict]] = {}
    for label, r in rows.items():
        m = _SEED.match(label)
        if m:
            groups.setdefault(m.group(1), []).append(r)
    out = {}
    for name, rs in groups.items():
        cols = [c for c in rs[0]["bpb"] if all(c in r["bpb"] for r in rs)]
        stat = lambda xs: (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)  # noqa: E731
        out[name] = {"seeds": len(rs), "bpb": {c: stat([r["bpb"][c] for r in rs]) for c in cols},
                     "mean": stat([r["mean"] for r in rs])}
    return out


def routing_summary(routing: dict) -> dict[str, dict]:
    """Per evaluated domain: the public expert's share of routing probability (layer mean) and of top-k slots,
    and per layer which owner expert gets the most probability."""
    experts = routing["experts"]
    out = {}
    for dom, r in routing["domains"].items():
        probs, frac = r["mean_prob"], r["fraction"]  # (layers, experts)
        top = [experts[1 + max(range(len(p) - 1), key=lambda e: p[1 + e])] for p in probs]
        out[dom] = {"public_prob": statistics.fmean(p[0] for p in probs),
                    "public_in_topk": statistics.fmean(f[0] for f in frac),
                    "top_owner_per_layer": top, "own_top_layers": sum(t == dom for t in top)}
    return out


def _cell(r: dict, c: str, best: float | None) -> str:
    v = r["bpb"].get(c)
    if v is None:
        return "—"
    return f"**{v:.4f}**" if best is not None and v == best else f"{v:.4f}"


def table_md(rows: dict[str, dict], columns: tuple[str, ...]) -> str:
    head = ("| system | active params (M) | " + " | ".join(columns) + " | mean |\n|---|---:|"
            + "---:|" * (len(columns) + 1) + "\n")
    best = {c: min((r["bpb"][c] for r in rows.values() if c in r["bpb"]), default=None) for c in columns}
    lines = [f"| {name} | {r.get('active_params', 0) / 1e6:.1f} | " + " | ".join(_cell(r, c, best[c]) for c in columns)
             + f" | {r['mean']:.4f} |" for name, r in rows.items()]
    return head + "\n".join(lines) + "\n"


def seeds_md(summary: dict[str, dict], columns: tuple[str, ...]) -> str:
    head = "| system | seeds | " + " | ".join(columns) + " | mean |\n|---|---:|" + "---:|" * (len(columns) + 1) + "\n"
    fmt = lambda ms: f"{ms[0]:.4f} ± {ms[1]:.4f}"  # noqa: E731
    return head + "\n".join(f"| {name} | {s['seeds']} | " + " | ".join(fmt(s["bpb"][c]) if c in s["bpb"] else "—"
                                                                          for c in columns) + f" | {fmt(s['mean'])} |"
                            for name, s in summary.items()) + "\n"


def extraction_md(ext: dict) -> list[str]:
    """The extraction table (issue 19): per model, the rates on the owner's training text with 95% Wilson intervals,
    and on its held-out text (a control: what any good model of the domain reproduces without having seen it)."""
    ci = lambda r: f"{r['rate'] * 100:.1f}% [{r['low'] * 100:.1f}, {r['high'] * 100:.1f}]"  # noqa: E731
    pct = lambda r: f"{r['rate'] * 100:.1f}%"  # noqa: E731
    owner, rows = ext["owner"], ext["rows"]
    n, held = (next(iter(rows.values()))[split] for split in ("train", "eval"))  # the same for every model
    md = [f"## Extraction of {owner}'s training text", "",
          f"{ext['prefix_len']}-token prefixes of {n['n']} of the {n['documents']} {owner} training documents (one "
          f"each, seed {ext['seed']}; {n['skipped_short']} shorter than {ext['prefix_len'] + ext['gen_len']} tokens "
          f"skipped), greedily continued by {ext['gen_len']} tokens (`flexmoe audit-extraction`, docs/privacy.md). "
          "Rates with 95% Wilson intervals; `similarity >= 0.9` is the paper's criterion (normalised Levenshtein, "
          "here over tokens of the greedy continuation; the paper samples). Held-out: the same on the owner's "
          "held-out text, which no model trained on.", "",
          "| model | exact match | LCP >= 50% | mean LCP | similarity >= 0.9 | "
          f"held-out (n = {held['n']}): exact | held-out: LCP >= 50% |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        t, e = r["train"], r["eval"]
        md.append(f"| {label} | {ci(t['exact_match'])} | {ci(t['lcp_half'])} | {pct(t['lcp_mean'])} | "
                  f"{ci(t['paper_similarity'])} | {pct(e['exact_match'])} | {pct(e['lcp_half'])} |")
    return md + [""]


def check_targets(rows: dict[str, dict], meta: dict, domains: tuple[str, ...]) -> list[tuple[str, bool, str]]:
    """The router issue's targets as (statement, met, evidence); seed means where the rows have seeds."""
    ref, seeds = meta["reference"], meta["seeds"]
    summary = seed_summary(rows)
    mean_of = lambda name, c: summary[name]["bpb"][c][0]  # noqa: E731
    merged = f"{ref} top-2"
    anchor = rows["anchor"]["bpb"]
    checks = [("public <= anchor + 1%", mean_of(merged, "public") <= 1.01 * anchor["public"],
               f"{mean_of(merged, 'public'):.4f} vs {anchor['public']:.4f} "
               f"({(mean_of(merged, 'public') / anchor['public'] - 1) * 100:+.1f}%)")]
    gaps = {d: mean_of(merged, d) / mean_of("experts alone, own domain", d) - 1 for d in domains}
    for d, g in gaps.items():
        checks.append((f"{d} within 5% of its own expert alone", g <= 0.05, f"{g * 100:+.1f}%"))
    checks.append(("mean of the gaps <= 3%", statistics.fmean(gaps.values()) <= 0.03,
                   f"{statistics.fmean(gaps.values()) * 100:+.1f}%"))
    for btm in (k for k in summary if k.startswith("BTM")):
        a, b = mean_of(merged, "mixed"), mean_of(btm, "mixed")
        act = rows[f"{merged} (s{seeds[0]})"]["active_params"] / rows[f"{btm} (s{seeds[0]})"]["active_params"]
        checks.append((f"merged top-2 <= {btm} on mixed-domain windows, at <= 1/2 its active parameters",
                       a <= b and act <= 0.5, f"{a:.4f} vs {b:.4f}, {act:.2f}x the parameters"))
    rnd = "random top-2"
    if rnd in summary:
        gap = summary[rnd]["mean"][0] - summary[merged]["mean"][0]
        spread = max(summary[rnd]["mean"][1], summary[merged]["mean"][1])
        checks.append(("embedding rows beat random rows by > 2 seed spreads", gap > 2 * spread,
                       f"mean {summary[merged]['mean'][0]:.4f} vs {summary[rnd]['mean'][0]:.4f} "
                       f"(gap {gap:+.4f}, spread {spread:.4f}, {summary[merged]['seeds']} seeds)"))
    nob = f"{ref} top-2, no bias"
    if nob in summary:
        checks.append(("with bias beats without", summary[merged]["mean"][0] < summary[nob]["mean"][0],
                       f"mean {summary[merged]['mean'][0]:.4f} vs {summary[nob]['mean'][0]:.4f}"))
    biases = [b for label, e in meta["experts"].items() if label.startswith(f"{ref}-s") for b in e.get("bias", [])]
    if biases:
        checks.append(("the bias is non-zero", min(biases) < -1e-3,
                       f"min(b, 0) from {min(biases):+.4f} to {max(biases):+.4f} over {len(biases)} layer-experts"))
    report = meta["opt_out"]
    for d, r in report.items():
        rec = r["recovery"]
        checks.append((f"opt-out {d}: own domain moves >= 70% back to the anchor", rec is not None and rec >= 0.7,
                       "n/a" if rec is None else f"{rec * 100:.0f}%"))
        worst = max(abs(v) for v in r["relative_delta_other"].values())
        checks.append((f"opt-out {d}: every other domain moves <= 1%", worst <= 0.01, f"max {worst * 100:.2f}%"))
    routing = meta["routing_summary"].get(f"{merged} (s{seeds[0]})")
    if routing:
        pub = routing["public"]["public_prob"]
        checks.append(("public expert holds >= 40% of the mass on public text", pub >= 0.4, f"{pub * 100:.1f}%"))
        layers = len(routing["public"]["top_owner_per_layer"])
        need = math.ceil(0.75 * layers)
        for d in domains:
            k = routing[d]["own_top_layers"]
            checks.append((f"{d} is the top owner expert on {d} in >= {need} of {layers} layers", k >= need,
                           f"{k} of {layers}"))
    return checks


def write_results(out: Path, rows: dict[str, dict], meta: dict, domains: tuple[str, ...]) -> None:
    ref, seeds = meta["reference"], meta["seeds"]
    columns = ("public", *domains, "mixed")
    meta = {**meta, "opt_out": opt_out_report(rows, domains, f"{ref} top-2 (s{seeds[0]})"),
            "routing_summary": {k: routing_summary(v["routing"]) for k, v in rows.items() if v.get("routing")}}
    checks = check_targets(rows, meta, domains)
    summary = seed_summary(rows)
    a = meta["anchor"]
    md = ["# FlexOlmo small-scale reproduction", "",
          f"Held-out bits per byte (lower is better) per domain; `public` is the anchor's own domain, `mixed` "
          f"windows of 4 x {meta['scale_settings']['mixed_segment']}-token segments of different domains; mean over "
          f"the {len(domains) + 1} domains (not mixed). Reference variant: `{ref}`. Device: {meta['device']}; "
          f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}; total wall "
          f"{meta['timings_s']['total']:.0f}s. Anchor: {a['params'] / 1e6:.1f}M parameters, {a['tokens'] / 1e6:.1f}M "
          f"tokens ({a['tokens_per_param']:.2f} per parameter).", "", table_md(rows, columns),
          "## Seeds (mean ± std)", "", seeds_md(summary, columns), "## Routing (top-2)", "",
          "| model | public prob. on public | public in top-2 on public | own expert top owner (layers) | "
          "top owner per layer |", "|---|---:|---:|---|---|"]
    for label, rs in meta["routing_summary"].items():
        own = ", ".join(f"{d} {rs[d]['own_top_layers']}" for d in domains if d in rs)
        tops = "; ".join(f"{d}: {' '.join(rs[d]['top_owner_per_layer'])}" for d in rs if d in domains)
        md.append(f"| {label} | {rs['public']['public_prob'] * 100:.1f}% | {rs['public']['public_in_topk'] * 100:.1f}% "
                  f"| {own} | {tops} |")
    md += ["", f"## Opt-out (reference: {ref} top-2, seed {seeds[0]})", "",
           "| removed | recovery on own domain | " + " | ".join(f"Δ {c}" for c in columns) + " |",
           "|---|---:|" + "---:|" * len(columns)]
    for d, r in meta["opt_out"].items():
        rec = "n/a" if r["recovery"] is None else f"{r['recovery'] * 100:.0f}%"
        md.append(f"| {d} | {rec} | " + " | ".join(f"{r['delta'][c]:+.4f}" for c in columns) + " |")
    md += [""] + (extraction_md(meta["extraction"]) if meta.get("extraction") else [])
    md += ["## Experts", "", "| expert | steps | epochs of owner text | final loss | min(b, 0) per layer | wall s |",
           "|---|---:|---:|---:|---|---:|"]
    for label, e in meta["experts"].items():
        bias = " ".join(f"{b:+.3f}" for b in e.get("bias", []))
        md.append(f"| {label} | {e['steps']} | {e['epochs']:.2f} | {e['final_loss']:.3f} | {bias} | {e['wall_s']:.0f} |")
    md += ["", "## Targets", "", "| target | met | evidence |", "|---|---|---|"]
    md += [f"| {s} | {'yes' if ok else '**no**'} | {ev} |" for s, ok, ev in checks]
    md += ["", "## Stage wall times (s)", "", " · ".join(f"{k} {v:.0f}" for k, v in meta["timings_s"].items()), ""]
    (out / "results.md").write_text("\n".join(md))
    slim = {k: {"bpb": v["bpb"], "mean": v["mean"], "active_params": v.get("active_params")} for k, v in rows.items()}
    routing = {k: v["routing"] for k, v in rows.items() if v.get("routing")}
    (out / "results.json").write_text(json.dumps({"rows": slim, "seeds": summary, "routing": routing,
                                                  "targets": [{"target": s, "met": ok, "evidence": ev}
                                                              for s, ok, ev in checks], **meta}, indent=2) + "\n")
