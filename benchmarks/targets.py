"""Pure: the table's numbers → the performance targets (benchmarks/RESULTS.md, "Targets"),
each with its value and whether it is met.

Judged on the medians over the rounds (one round: its own numbers), so a claim in RESULTS.md is
what ``make bench`` printed, not a reading of the table by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.table import MIB, Summary

DEFAULTS_ROW = "ours: detect stage (defaults"  # also "(defaults, KEY=VALUE)" under --set
DETECT_ROW = "ours: detect stage ("
FLOW_ROW = "ours: whole flow (detectflow run)"  # on its own: temporary Prefect server, new Ray
SERVICES_ROW = "ours: whole flow (long-lived Prefect + Ray)"  # as deployments run
# (x reference, share of the limit) per device; outside detect < 10 s is a CPU target only.
GOALS = {"cpu": (1.5, 0.90), "cuda": (3.0, 0.80)}
OVERHEAD_GOAL = 10.0
FLAT = 0.10  # peak PSS may grow this much from N to 10xN and still count as flat


@dataclass
class Verdict:
    target: str
    value: str
    met: bool | None  # None: measured, but no target for this device (or not measured)

    def line(self) -> str:
        mark = {True: "yes", False: "NO", None: "-"}[self.met]
        return f"  {mark:<3}  {self.target}: {self.value}"


def _rows(summaries: list[Summary], prefix: str) -> list[Summary]:
    return [s for s in summaries if s.pipeline.startswith(prefix) and s.kind == "pipeline"]


def check(summaries: list[Summary], device: str) -> list[Verdict]:
    """The targets that the measured rows can judge (a row that was skipped judges nothing)."""
    x_ref, share = GOALS.get(device, GOALS["cpu"])
    out: list[Verdict] = []
    defaults = sorted(_rows(summaries, DEFAULTS_ROW), key=lambda s: s.images)
    for s in defaults:
        wall, steady = s.median("x ref wall"), s.median("x ref")
        if wall is not None:
            out.append(Verdict(f"ours (defaults) >= {x_ref:g}x reference on wall time, "
                               f"{s.images} images", f"{wall:.2f}x wall, {steady:.2f}x steady",
                               wall >= x_ref))
    if device == "cuda":  # the levers may carry it: the best detect-stage row at the largest N
        tried = [s for s in _rows(summaries, DETECT_ROW) if s.median("x ref wall") is not None]
        if tried:
            n = max(s.images for s in tried)
            best = max((s for s in tried if s.images == n), key=lambda s: s.median("x ref wall"))
            wall = best.median("x ref wall")
            out.append(Verdict(f"best setting >= {x_ref:g}x reference on wall time, {n} images",
                               f"{wall:.2f}x wall, {best.median('x ref'):.2f}x steady "
                               f"({best.pipeline})", wall >= x_ref))
    bounded = [s for s in defaults if s.median("x limit") is not None]
    if bounded:
        s = bounded[-1]  # the largest run: start-up weighs least in its steady rate
        ratio = s.median("x limit")
        out.append(Verdict(f"ours (defaults) >= {share:.0%} of the limit, {s.images} images",
                           f"{ratio:.0%}", ratio >= share))
    flows = {FLOW_ROW: "on its own", SERVICES_ROW: "against long-lived Prefect and Ray"}
    for s in summaries:
        if s.pipeline in flows and (overhead := s.median("overhead")) is not None:
            goal = OVERHEAD_GOAL if device == "cpu" else None
            out.append(Verdict(f"whole flow outside detect < {OVERHEAD_GOAL:g} s "
                               f"({flows[s.pipeline]})",
                               f"{overhead:.1f} s", overhead < goal if goal else None))
    measured = [s for s in defaults if s.peak("pss")]
    if len(measured) > 1:
        small, big = measured[0], measured[-1]
        growth = big.peak("pss") / small.peak("pss") - 1
        store, budget = big.peak("store"), big.store_budget
        flat = growth <= FLAT and (store is None or budget is None or store <= budget)
        store_text = "" if store is None else f", store {store / MIB:,.0f} MiB" + (
            f" (budget {budget / MIB:,.0f} MiB)" if budget else "")
        out.append(Verdict(f"memory flat, {small.images} -> {big.images} images",
                           f"peak PSS {growth:+.1%}{store_text}", flat))
    return out


def format_verdicts(verdicts: list[Verdict], device: str, rounds: int) -> str:
    basis = f"medians over {rounds} rounds" if rounds > 1 else "one round"
    return "\n".join([f"targets ({device}; {basis}):"] + [v.line() for v in verdicts])
