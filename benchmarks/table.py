"""Pure: benchmark results → one table (plain text for the terminal, markdown for RESULTS.md)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

MIB = 1 << 20
COLUMNS = ("pipeline", "images", "wall s", "img/s", "img/s steady", "x ref", "x ref wall", "x limit",
           "peak RSS MiB", "peak PSS MiB", "store MiB", "spilled MiB", "outside detect s")


@dataclass
class Row:
    pipeline: str
    images: int
    wall: float | None = None
    rate: float | None = None  # images / wall
    steady: float | None = None  # images/s once results flow (start-up excluded)
    rss: int | None = None
    pss: int | None = None
    store: int | None = None
    spilled: int | None = None
    overhead: float | None = None
    limit: float | None = None  # this row's own bound (e.g. the bare model at its precision)
    # "pipeline" rows get every ratio; the bare model ("bound") only x limit; the whole flow
    # ("flow": Prefect and Ray start-up included) none, the recipe has no such run to match.
    kind: str = "pipeline"
    store_budget: int | None = None  # the object-store budget the run was planned with
    group: str | None = None  # the name rounds are matched by (default: ``pipeline``)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def ratios(row: Row, refs: dict[int, Row], limit: float | None) -> dict[str, float | None]:
    """A row's ratios: ``x ref`` compares steady rates (wall when there is none) and ``x ref
    wall`` wall rates (start-up included: what a user waits for), each with the reference run
    over the same number of images; ``x limit`` compares with the bare model's steady rate."""
    speed = row.steady or row.rate
    limit = (row.limit or limit) if row.kind != "flow" else None
    ref = refs.get(row.images) if row.kind == "pipeline" else None
    ref_speed = (ref.steady or ref.rate) if ref else None
    return {"x ref": speed / ref_speed if speed and ref_speed else None,
            "x ref wall": row.rate / ref.rate if ref and row.rate and ref.rate else None,
            "x limit": speed / limit if speed and limit else None}


def cells(row: Row, refs: dict[int, Row], limit: float | None) -> list[str]:
    """One row's cells (``ratios`` for the three ratio columns)."""
    r = ratios(row, refs, limit)
    return [
        row.pipeline, str(row.images), _num(row.wall, ".1f"), _num(row.rate, ".2f"),
        _num(row.steady, ".2f"), _num(r["x ref"], ".2f"), _num(r["x ref wall"], ".2f"),
        _num(r["x limit"], ".0%"), _mib(row.rss), _mib(row.pss), _mib(row.store),
        _mib(row.spilled), _num(row.overhead, ".1f"),
    ]


def format_table(rows: list[Row], refs: dict[int, Row], limit: float | None,
                 markdown: bool = False) -> str:
    return layout(list(COLUMNS), [cells(r, refs, limit) for r in rows], markdown)


def layout(header: list[str], body: list[list[str]], markdown: bool = False) -> str:
    """Cells → aligned plain text (first column left, the rest right) or a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    table = [header] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


# --- Repeated rounds (``--repeat K``): each round's ratios against its own reference and bound,
# then the median of each number over the rounds, with its range.

Round = tuple[list[Row], dict[int, Row], float | None]  # rows, references by N, default bound
SUMMARY_COLUMNS = ("pipeline", "images", "rounds", "wall s", "img/s steady", "x ref",
                   "x ref wall", "x limit", "peak PSS MiB", "store MiB", "outside detect s")


@dataclass
class Summary:
    """One pipeline over the rounds: every measured value, in round order (None: not measured)."""

    pipeline: str
    images: int
    kind: str
    values: dict[str, list[float]]
    store_budget: int | None = None

    def median(self, key: str) -> float | None:
        return statistics.median(self.values[key]) if self.values.get(key) else None

    def peak(self, key: str) -> float | None:
        return max(self.values[key]) if self.values.get(key) else None


def summarize(rounds: list[Round]) -> list[Summary]:
    """Rows with the same pipeline (or group: a bound whose sweep picked another layout in
    another round) and image count, across rounds (in first-seen order).

    Ratios are taken inside each round (against that round's own reference and bound, as the
    single table does) before any median, never between numbers from different rounds.
    """
    out: dict[tuple[str, int], Summary] = {}
    for rows, refs, limit in rounds:
        for row in rows:
            name = row.group or row.pipeline
            s = out.setdefault((name, row.images), Summary(name, row.images, row.kind, {}))
            s.store_budget = s.store_budget or row.store_budget
            measured = {"wall": row.wall, "steady": row.steady or row.rate, "pss": row.pss,
                        "store": row.store, "overhead": row.overhead, **ratios(row, refs, limit)}
            for key, value in measured.items():
                if value is not None:
                    s.values.setdefault(key, []).append(value)
    return list(out.values())


def _spread(s: Summary, key: str, fmt: str) -> str:
    med = s.median(key)
    if med is None:
        return "-"
    vals = s.values[key]
    spread = f" ({min(vals):{fmt}}-{max(vals):{fmt}})" if len(vals) > 1 else ""
    return f"{med:{fmt}}{spread}"


def format_summary(summaries: list[Summary], markdown: bool = False) -> str:
    """Medians over the rounds, with (min-max) where there was more than one round; memory is
    the peak over all rounds."""
    body = []
    for s in summaries:
        body.append([
            s.pipeline, str(s.images), str(max(map(len, s.values.values()), default=0)),
            _spread(s, "wall", ".1f"), _spread(s, "steady", ".2f"), _spread(s, "x ref", ".2f"),
            _spread(s, "x ref wall", ".2f"), _spread(s, "x limit", ".0%"),
            _mib(s.peak("pss")), _mib(s.peak("store")), _spread(s, "overhead", ".1f"),
        ])
    return layout(list(SUMMARY_COLUMNS), body, markdown)
