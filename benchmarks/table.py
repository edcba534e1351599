"""Pure: benchmark results → one table (plain text for the terminal, markdown for RESULTS.md)."""

from __future__ import annotations

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


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def cells(row: Row, refs: dict[int, Row], limit: float | None) -> list[str]:
    """One row's cells. ``x ref`` compares steady rates (wall when there is none) and ``x ref
    wall`` wall rates (start-up included: what a user waits for), each with the reference run
    over the same number of images; ``x limit`` compares with the bare model's steady rate."""
    speed = row.steady or row.rate
    limit = (row.limit or limit) if row.kind != "flow" else None
    ref = refs.get(row.images) if row.kind == "pipeline" else None
    ref_speed = (ref.steady or ref.rate) if ref else None
    return [
        row.pipeline, str(row.images), _num(row.wall, ".1f"), _num(row.rate, ".2f"),
        _num(row.steady, ".2f"),
        _num(speed / ref_speed if speed and ref_speed else None, ".2f"),
        _num(row.rate / ref.rate if ref and row.rate and ref.rate else None, ".2f"),
        _num(speed / limit if speed and limit else None, ".0%"),
        _mib(row.rss), _mib(row.pss), _mib(row.store), _mib(row.spilled),
        _num(row.overhead, ".1f"),
    ]


def format_table(rows: list[Row], refs: dict[int, Row], limit: float | None,
                 markdown: bool = False) -> str:
    body = [list(COLUMNS)] + [cells(r, refs, limit) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(body[0]) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body[1:]])
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(body[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body[1:]])
