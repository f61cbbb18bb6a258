"""The committed example report (docs/example-report) is what its own runs give: made again
from the run files it keeps (``--copy-runs``), its table has the same numbers, timings aside."""

import csv
from pathlib import Path

from experiments.report import report

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example-report"


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("detection_seconds")}
                for row in csv.DictReader(f)]


def test_the_example_report_is_remade_from_its_runs(tmp_path):
    report([EXAMPLE / "runs"], tmp_path, "layercam-report docs/example-report/runs")
    assert read_table(tmp_path / "table.csv") == read_table(EXAMPLE / "table.csv")
    for plot in ("accuracy.png", "roc.png", "detection-seconds.png", "scores.png", "heatmaps.png"):
        assert (tmp_path / plot).stat().st_size > 0
    assert "layercam-report" in (EXAMPLE / "report.md").read_text()
