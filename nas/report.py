"""Plain-text tables for the terminal (spaces, architectures, metrics)."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Left-aligned text table; numbers right-aligned."""
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(values):
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def format_arch(arch) -> str:
    """The architecture as its family describes it (for psvit, one row per stage)."""
    from nas.families import family_of

    return family_of(arch).describe_arch(arch)


def format_space(space, largest, smallest) -> str:
    from nas.families import family_of

    lines = [f"space {space.name} ({space.family}) from {space.source}"]
    if space.spec.description:
        lines.append(space.spec.description)
    lines += [f"members: {space.count():,}", "", "choices:"]
    lines += family_of(space).describe_choices(space.describe())
    lines += ["", "largest:", format_arch(largest), "", "smallest:", format_arch(smallest)]
    return "\n".join(lines)


FRONT_COLUMNS = [
    "trial_number",
    "val_accuracy",
    "latency_ms",
    "latency_p90_ms",
    "gflops",
    "params_m",
    "arch_hash",
]


def format_front(rows: list[dict], budget_ms: float | None = None) -> str:
    """The Pareto front, fastest first; ``*`` marks the best trial under the budget, and a legend line
    under the table says what the star means. ``budget_ms`` None: the budget the rows were ranked
    with (their ``latency_budget_ms``, as ``Campaign.front_rows`` and ``tag_pareto`` give them)."""
    if not rows:
        return "Pareto front: no finished trials"
    if budget_ms is None:
        budget_ms = next(
            (r["latency_budget_ms"] for r in rows if r.get("latency_budget_ms") is not None), None
        )
    shown = [
        {"best": "*" if r.get("best_under_budget") else "", **{c: r.get(c) for c in FRONT_COLUMNS}}
        for r in rows
    ]
    noisy = sum(bool(r.get("latency_noisy")) for r in rows)  # the metric nas.search.scoring records
    columns = ["best", *FRONT_COLUMNS] + (["noisy"] if noisy else [])
    for row, r in zip(shown, rows):
        row["noisy"] = "noisy" if r.get("latency_noisy") else ""
    note = f" ({noisy} with a noisy latency: rank with care)" if noisy else ""
    table = format_table(shown, columns)
    return f"Pareto front, {len(rows)} trials{note}:\n{table}\n{front_legend(rows, budget_ms)}"


def front_legend(rows: list[dict], budget_ms: float | None) -> str:
    """What the ``*`` of ``format_front`` marks (the trial MLflow tags ``best_under_budget``)."""
    if budget_ms is None or budget_ms == float("inf"):
        return "* = best_under_budget: the most accurate trial, at any latency (no latency budget)"
    if not any(r.get("best_under_budget") for r in rows):
        return f"no trial is within the latency budget of {budget_ms:g} ms: none is marked best_under_budget"
    return f"* = best_under_budget: the most accurate trial within the latency budget of {budget_ms:g} ms"
