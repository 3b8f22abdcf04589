"""The accuracy/latency Pareto figures of a campaign: interactive (plotly) and static (matplotlib).

Rows are ``TrialRecord.as_row()`` dicts: ``trial_number``, ``arch_hash``, the metrics, ``pareto``
and ``best_under_budget``. Rows missing either metric are left out. The HTML embeds plotly.js:
it opens offline and never loads anything from a CDN.
"""

from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go
from matplotlib.figure import Figure

from nas.names import ACCURACY, LATENCY


def _plotted(rows: list[dict], acc_key: str, lat_key: str) -> tuple[list[dict], list[dict], dict | None]:
    """(all plottable rows, the front by latency, the best row under the budget)."""
    ok = [r for r in rows if _number(r.get(acc_key)) and _number(r.get(lat_key))]
    front = sorted((r for r in ok if r.get("pareto")), key=lambda r: (r[lat_key], -r[acc_key]))
    best = next((r for r in ok if r.get("best_under_budget")), None)
    return ok, front, best


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def pareto_figure(
    rows: list[dict], budget_ms: float | None, acc_key: str = ACCURACY, lat_key: str = LATENCY
) -> go.Figure:
    """Every trial as a point (hover: trial, arch hash, accuracy, latency, GFLOPs), the front as a
    staircase, the budget as a vertical line."""
    ok, front, best = _plotted(rows, acc_key, lat_key)
    # hover shows numbers and the hex arch hash only (as customdata): no run names or free text,
    # which plotly would render as its pseudo-HTML
    hover = (
        "trial %{customdata[0]}<br>arch %{customdata[1]}<br>accuracy %{y:.4f}<br>"
        "latency %{x:.3f} ms<br>GFLOPs %{customdata[2]}<extra></extra>"
    )

    def trace(points: list[dict], **style) -> go.Scatter:
        return go.Scatter(
            x=[r[lat_key] for r in points],
            y=[r[acc_key] for r in points],
            hovertemplate=hover,
            customdata=[[r.get("trial_number"), str(r.get("arch_hash", "")), _gflops(r)] for r in points],
            **style,
        )

    fig = go.Figure()
    fig.add_trace(
        trace(
            [r for r in ok if not r.get("pareto")],
            name="trials",
            mode="markers",
            marker={"color": "#9aa5b1", "size": 7},
        )
    )
    fig.add_trace(
        trace(
            front,
            name="Pareto front",
            mode="lines+markers",
            line_shape="hv",
            marker={"color": "#d1495b", "size": 9},
            line={"color": "#d1495b"},
        )
    )
    if best is not None:
        fig.add_trace(
            trace(
                [best],
                name="best under budget",
                mode="markers",
                marker={"symbol": "star", "size": 16, "color": "#edae49", "line": {"width": 1}},
            )
        )
    if budget_ms is not None:
        fig.add_vline(
            x=budget_ms,
            line_dash="dash",
            line_color="#30638e",
            annotation_text=f"budget {budget_ms:g} ms",
            annotation_position="top left",
        )
    fig.update_layout(
        title=f"Accuracy vs latency: {len(ok)} trials, {len(front)} on the front",
        xaxis_title=f"{lat_key} (measured)",
        yaxis_title=acc_key,
        template="plotly_white",
        hovermode="closest",
    )
    return fig


def _gflops(row: dict) -> str:
    value = row.get("gflops")
    return f"{value:.3f}" if _number(value) else "-"


def pareto_html(
    rows: list[dict],
    budget_ms: float | None,
    path: str | Path,
    acc_key: str = ACCURACY,
    lat_key: str = LATENCY,
) -> None:
    """A self-contained HTML page: plotly.js inline (a few MB), no CDN, works offline."""
    pareto_figure(rows, budget_ms, acc_key, lat_key).write_html(
        path, include_plotlyjs=True, full_html=True, include_mathjax=False
    )


def pareto_png(
    rows: list[dict],
    budget_ms: float | None,
    path: str | Path,
    acc_key: str = ACCURACY,
    lat_key: str = LATENCY,
) -> None:
    """The same figure, static, with matplotlib's Agg canvas (no pyplot, no global backend change)."""
    ok, front, best = _plotted(rows, acc_key, lat_key)
    fig = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    rest = [r for r in ok if not r.get("pareto")]
    ax.scatter([r[lat_key] for r in rest], [r[acc_key] for r in rest], s=14, c="#9aa5b1", label="trials")
    ax.step(
        [r[lat_key] for r in front],
        [r[acc_key] for r in front],
        where="post",
        c="#d1495b",
        marker="o",
        ms=5,
        label="Pareto front",
    )
    if best is not None:
        ax.scatter(
            [best[lat_key]],
            [best[acc_key]],
            marker="*",
            s=180,
            c="#edae49",
            edgecolors="k",
            zorder=3,
            label="best under budget",
        )
    if budget_ms is not None:
        ax.axvline(budget_ms, ls="--", c="#30638e", label=f"budget {budget_ms:g} ms")
    ax.set(
        xlabel=f"{lat_key} (measured)",
        ylabel=acc_key,
        title=f"Accuracy vs latency: {len(ok)} trials, {len(front)} on the front",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path)
