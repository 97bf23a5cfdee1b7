"""Benchmark harness: a `report` fixture that collects medians, and a summary table of
ratios against each group's baseline (same process, same run) printed at the end and
written to bench/results/report.md and report.json.

Run: `make bench` or `.venv/bin/python -m pytest bench -q --benchmark-only` (add
`--device cuda` on a GPU machine).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # bench/shapes.py importable from every bench file

RESULTS = Path(__file__).parent / "results"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device to benchmark on (cpu or cuda)")


@pytest.fixture(scope="session")
def device(request):
    return request.config.getoption("--device")


class Report:
    def __init__(self):
        self.rows = []  # dicts: group, name, median_s, baseline (bool), numel, floor_bytes, note
        self.wants = []
        self.checks = []

    def add(self, group, name, benchmark_or_seconds, *, baseline=False, numel=None, floor_bytes=None, note=""):
        if hasattr(benchmark_or_seconds, "stats"):
            median = benchmark_or_seconds.stats.stats.median
        else:
            median = float(benchmark_or_seconds)
        self.rows.append(
            dict(group=group, name=name, median_s=median, baseline=baseline, numel=numel,
                 floor_bytes=floor_bytes, note=note)
        )

    def want(self, label, slow, fast, target, ok, group=None):
        """A ratio to report at the end: time(slow) / time(fast) (rows of `group`), with its target."""
        if all(w[0] != label for w in self.wants):
            self.wants.append((label, slow, fast, target, ok, group))

    def check(self, label, value, target, ok):
        """An absolute number to report at the end, with its target."""
        self.checks.append(f"{label}: {value:.2f} (target {target}) {'OK' if ok(value) else 'MISSED'}")

    def _median(self, name, group=None):
        return next(
            (r["median_s"] for r in self.rows if r["name"] == name and group in (None, r["group"])), None
        )

    def ratios(self) -> list[str]:
        out = []
        for label, slow, fast, target, ok, group in self.wants:
            a, b = self._median(slow, group), self._median(fast, group)
            if a is None or b is None:
                continue
            r = a / b
            out.append(f"{label}: {r:.2f} (target {target}) {'OK' if ok(r) else 'MISSED'}")
        return out + self.checks

    def table(self) -> str:
        bw = next((r["bytes_per_s"] for r in self.rows if "bytes_per_s" in r), None)
        lines = []
        if bw:
            lines.append(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s (read + write bytes per second)\n")
        # "of copy": floor / effective = the achieved bandwidth (the bytes the method must
        # move, per second) as a fraction of the measured copy bandwidth
        lines.append("| group | what | median ms | × baseline | effective B/elem | floor B/elem | of copy | note |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---|")
        groups = []
        for r in self.rows:
            if r["group"] not in groups:
                groups.append(r["group"])
        for g in groups:
            rows = [r for r in self.rows if r["group"] == g]
            base = next((r for r in rows if r["baseline"]), rows[0])
            for r in rows:
                eff = ""
                if bw and r["numel"]:
                    eff = f"{r['median_s'] * bw / r['numel']:.1f}"
                floor = "" if r["floor_bytes"] is None else str(r["floor_bytes"])
                ratio = r["median_s"] / base["median_s"]
                mark = " (baseline)" if r is base else ""
                frac = ""
                if eff and r["floor_bytes"]:
                    frac = f"{100 * r['floor_bytes'] / float(eff):.0f}%"
                lines.append(
                    f"| {g} | {r['name']}{mark} | {r['median_s'] * 1e3:.2f} | {ratio:.2f} | {eff} | {floor} | {frac} | "
                    f"{r['note']} |"
                )
        ratios = self.ratios()
        if ratios:
            lines += ["", *ratios]
        return "\n".join(lines)


_REPORT = Report()


@pytest.fixture(scope="session")
def report():
    return _REPORT


def pytest_terminal_summary(terminalreporter):
    if not _REPORT.rows:
        return
    text = _REPORT.table()
    terminalreporter.write_sep("=", "cl_core benchmark ratios (same run)")
    terminalreporter.write_line(text)
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "report.md.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, RESULTS / "report.md")
    tmp = RESULTS / "report.json.tmp"
    tmp.write_text(json.dumps(_REPORT.rows, indent=1))
    os.replace(tmp, RESULTS / "report.json")
