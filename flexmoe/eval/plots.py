"""PNG figures of an evaluation: a BPB bar chart and, per domain, a layers x experts routing heatmap."""

from __future__ import annotations

import re
from pathlib import Path

from flexmoe.eval.bpb import DomainBPB
from flexmoe.eval.routing import RoutingStats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window (headless machines, tests)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    import io

    from flexmoe.io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "domain"


def bpb_bar_chart(results: list[DomainBPB], out: Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(results)), 3.5))
    bars = ax.bar([r.domain for r in results], [r.bpb for r in results], color="#4C72B0")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(title or "held-out BPB per domain", fontsize=9)
    ax.margins(y=0.15)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def routing_heatmap(stats: RoutingStats, domain: str, out: Path) -> Path:
    plt = _pyplot()
    d = stats.domains[domain]
    layers, experts = len(d.fraction), len(stats.experts)
    # With every expert active the top-k share is 1 everywhere and says nothing: show router probabilities.
    dense = stats.top_k >= experts
    values = d.mean_prob if dense else d.fraction
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * experts, 1.4 + 0.35 * layers))
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(experts), stats.experts, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    what = "mean router probability of each expert" if dense else f"share of tokens routed to each expert (top-{stats.top_k})"
    ax.set_title(f"{domain}: {what}", fontsize=9)
    if layers * experts <= 160:  # numbers stay readable only on small grids
        for li, row in enumerate(values):
            for e, v in enumerate(row):
                ax.text(e, li, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def write_plots(out_dir: str | Path, results: list[DomainBPB], routing: RoutingStats | None,
                title: str = "") -> list[Path]:
    """`bpb.png` plus `routing_<domain>.png` per domain into `out_dir` (created); returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [bpb_bar_chart(results, out_dir / "bpb.png", title)]
    if routing is not None:
        for dom in routing.domains:
            files.append(routing_heatmap(routing, dom, out_dir / f"routing_{_safe(dom)}.png"))
    return files
