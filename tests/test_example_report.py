"""The committed example report (docs/example-report) is what its own runs give: made again
from the run files it keeps (``--copy-runs``) by the command it names, its ``report.md`` and
``table.csv`` are the committed ones, every figure included (the detection times too: they are
read from the runs' ``rounds.jsonl``, not measured again). So a change to the report's code that
changes a number fails here, until the example report is made again with it."""

from pathlib import Path

from experiments.report import report

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example-report"
COMMAND = "layercam-report docs/example-report/runs --out docs/example-report"
"""The command the committed report.md says made it (from the repository root)."""
PLOTS = ("accuracy.png", "roc.png", "detection-seconds.png", "scores.png")
"""Drawn by matplotlib: their bytes depend on its version, so only their presence is checked."""


def as_committed(text: str, out: Path) -> str:
    """A remade file's text with the paths that differ from the committed one's written as
    there (a left-out run is named by its path: the test's output folder and this checkout's
    absolute path instead of docs/example-report). Line endings are compared as text."""
    for folder in (out, EXAMPLE):
        text = text.replace(str(folder), "docs/example-report")
    return text


def test_the_example_report_is_remade_from_its_runs(tmp_path):
    made = report([EXAMPLE / "runs"], tmp_path, COMMAND)
    assert made == tmp_path / "report.md"
    remake = f"the report's code changed a figure? If meant, remake the example: {COMMAND}"
    assert as_committed(made.read_text(), tmp_path) == (EXAMPLE / "report.md").read_text(), remake
    assert as_committed((tmp_path / "table.csv").read_text(), tmp_path) == (
        EXAMPLE / "table.csv").read_text(), remake
    # A copy of the heat-map grid one of the runs saved.
    assert (tmp_path / "heatmaps.png").read_bytes() == (EXAMPLE / "heatmaps.png").read_bytes()
    for plot in PLOTS:
        assert (tmp_path / plot).stat().st_size > 0, plot
        assert (EXAMPLE / plot).stat().st_size > 0, plot
