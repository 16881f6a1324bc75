"""Time ``morphotype.report.write_report`` on a run's output folder (target: <= 30 s for the demo).

Usage: python benchmarks/report.py OUTDIR [REPORT_DIR]
Prints the total time, the number of figures, the slowest figures and the page size.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from morphotype import report


def main() -> None:
    outdir = Path(sys.argv[1])
    report_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="morphotype-report-"))
    writers = []
    original = report.FigureWriter.__init__

    def remember(self, *args, **kwargs):  # keep the writer to read its per-figure timings
        original(self, *args, **kwargs)
        writers.append(self)

    report.FigureWriter.__init__ = remember
    started = time.perf_counter()
    path = report.write_report(outdir, report_dir=report_dir)
    total = time.perf_counter() - started
    seconds = writers[0].seconds
    print(f"write_report: {total:.1f} s, {len(seconds)} figures ({sum(seconds.values()):.1f} s rendering), "
          f"{len(list(outdir.glob('models/*/model_card.json')))} models, "
          f"index.html {path.stat().st_size / 1e6:.1f} MB")
    for name, value in sorted(seconds.items(), key=lambda item: -item[1])[:5]:
        print(f"  {value:5.2f} s  {name}")


if __name__ == "__main__":
    main()
