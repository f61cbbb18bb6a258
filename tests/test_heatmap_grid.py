"""The heat-map grid (``layercam-ae-save-heatmaps``): each map laid over its probe where it
belongs, one row per client and one column per probe, excluded clients marked, and a picture
that stays small with many clients. No Flower run: the harness's ``RoundLog`` is fed a record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from server_app import heatmap_grid
from server_app.heatmap_grid import grey_image, overlay, rows_to_draw, short_ids, upsampled_map
from server_app.results import ResultsWriter, RoundLog
from strategies.records import RoundRecord



def hot_cell_map(size: int = 7, at: tuple[int, int] = (1, 5)) -> np.ndarray:
    cam = np.zeros((size, size), dtype=np.float32)
    cam[at] = 1.0
    return cam


def test_a_single_hot_cell_lands_on_its_region_of_the_probe():
    """A 7x7 map hot in row 1, column 5 covers the probe's pixels 4-7 x 20-23 (28 / 7 = 4 per
    cell): upsampled bilinearly it peaks there and falls to 0 within about one cell."""
    heat = upsampled_map(hot_cell_map(), (28, 28))
    assert heat.shape == (28, 28) and heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert 4 <= peak[0] <= 7 and 20 <= peak[1] <= 23
    assert heat[4:8, 20:24].mean() > 0.5
    assert (heat[14:, :] == 0).all() and (heat[:, :14] == 0).all()  # far from the cell


def test_where_the_map_is_zero_the_probe_shows_unchanged_and_dark_stays_dark():
    grey = np.zeros((28, 28))
    grey[10:18, 2:26] = 1.0  # a bright bar on a black probe, away from the hot cell
    cell = overlay(grey, hot_cell_map())
    assert cell.shape == (28, 28, 3) and cell.min() >= 0.0 and cell.max() <= 1.0
    heat = upsampled_map(hot_cell_map(), (28, 28))
    cold = heat == 0
    assert cold.sum() > 28 * 28 // 2
    np.testing.assert_array_equal(cell[cold], np.repeat(grey[cold][:, None], 3, axis=1))
    assert (cell[20:, :] == 0).all()  # the probe's black, under a zero map: black
    # under the hot cell the colour shows: jet's top is red
    r, g, b = cell[5, 21]
    assert r > 0.2 and r > g and r > b


def test_overlay_opacity_follows_the_map():
    grey = np.full((8, 8), 0.5)
    weak = overlay(grey, np.full((2, 2), 1.0), alpha=0.0)  # no opacity: the probe alone
    np.testing.assert_allclose(weak, 0.5)
    full = overlay(grey, np.ones((2, 2)), alpha=1.0)  # a flat map scales to 0: the probe
    np.testing.assert_allclose(full, 0.5)


def test_a_probe_becomes_one_grey_image_in_0_1():
    probe = np.stack([np.arange(16.0).reshape(4, 4) - 3, np.zeros((4, 4)) + 7])  # 2 channels
    grey = grey_image(probe)
    assert grey.shape == (4, 4) and grey.min() == 0.0 and grey.max() == 1.0
    np.testing.assert_allclose(grey, np.arange(16.0).reshape(4, 4) / 15)
    assert (grey_image(np.full((1, 5, 5), -0.4)) == 0).all()  # constant: black


def test_rows_are_the_first_by_node_id_and_every_marked_one_in_node_id_order():
    ids = list(range(100, 0, -1))  # 100 clients, given in reverse order
    marked = {90, 95, 3}
    rows = rows_to_draw(ids, marked, limit=5)
    assert [ids[i] for i in rows] == [1, 2, 3, 4, 5, 90, 95]
    many = rows_to_draw(ids, set(range(50, 101)), limit=5)  # the marked ones are capped too
    assert [ids[i] for i in many] == [1, 2, 3, 4, 5, 50, 51, 52, 53, 54]
    assert rows_to_draw([7, 3], set(), limit=5) == [1, 0]


def test_row_labels_tell_every_drawn_client_apart():
    assert short_ids([7, 99999, 123456]) == ["7", "99999", "…23456"]
    # Flower's 64-bit ids can share their last five digits: the labels take more
    assert short_ids([123_400_012_345, 987_600_012_345, 3]) == ["…400012345", "…600012345",
                                                                "3"]
    same_tail = [10**9 + 12345, 2 * 10**9 + 12345]
    assert short_ids(same_tail) == ["1000012345", "2000012345"]


def grid_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("clients,probes", [(5, 4), (3, 6), (2, 1)])
def test_the_saved_grid_has_a_row_per_client_and_a_column_per_probe(tmp_path, clients, probes):
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, 2**62, clients)]
    path = ResultsWriter(tmp_path).save_heatmap_grid(
        3, rng.random((clients, probes, 7, 7)), ids, {ids[0]}, {ids[-1]},
        rng.normal(size=(probes, 1, 28, 28)), "layercam-ae")
    assert path == tmp_path / "heatmaps-round003.png"  # where layercam-report looks for it
    width = heatmap_grid.LABEL + max(probes, heatmap_grid.MIN_COLUMNS) * heatmap_grid.CELL
    height = heatmap_grid.TITLE + (clients + 1) * heatmap_grid.CELL  # + the probes' row
    assert grid_size(path) == (round((width + heatmap_grid.MARGIN) * heatmap_grid.DPI),
                               round((height + heatmap_grid.MARGIN) * heatmap_grid.DPI))
    assert not list(tmp_path.glob(".*.tmp"))


def test_many_clients_draw_a_bounded_number_of_rows(tmp_path):
    rng = np.random.default_rng(0)
    clients, limit = 200, heatmap_grid.MAX_ROWS
    ids = list(range(1000, 1000 + clients))
    excluded = set(ids[-3:])  # beyond the first rows: drawn all the same
    path = ResultsWriter(tmp_path).save_heatmap_grid(
        1, rng.random((clients, 2, 8, 8)), ids, excluded, set(), rng.normal(size=(2, 3, 32, 32)))
    rows = (grid_size(path)[1] / heatmap_grid.DPI - heatmap_grid.TITLE - heatmap_grid.MARGIN
            ) / heatmap_grid.CELL - 1
    assert rows == pytest.approx(limit + 3)


def test_maps_that_do_not_match_the_ids_or_probes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="probes"):
        ResultsWriter(tmp_path).save_heatmap_grid(1, np.zeros((2, 3, 7, 7)), [1, 2], set(),
                                                  probes=np.zeros((2, 1, 28, 28)))


def test_the_round_log_draws_the_records_maps_over_its_probes_then_drops_them(tmp_path):
    """The record's maps (K, P, h, w) and probes reach the grid; neither is written to
    rounds.jsonl nor kept once drawn."""
    rng = np.random.default_rng(0)
    record = RoundRecord(round=2, defense="layercam-ae", received=[11, 12, 13, 14], rejected={14: "x"},
                         kept=[11, 13], excluded=[12], scores={11: 0.1, 12: 5.0, 13: 0.2},
                         details={}, timings={}, aggregated=True,
                         heatmaps=rng.random((3, 2, 7, 7)), probes=rng.normal(size=(2, 1, 28, 28)))
    log = RoundLog(ResultsWriter(tmp_path), num_rounds=3)
    log.add_record(record, {11: False, 12: True, 13: False, 14: False})
    row = log.add_evaluation(2, 0.9, 0.3)
    path = tmp_path / "heatmaps-round002.png"
    width = heatmap_grid.LABEL + heatmap_grid.MIN_COLUMNS * heatmap_grid.CELL + heatmap_grid.MARGIN
    assert grid_size(path)[1] == round(
        (heatmap_grid.TITLE + 4 * heatmap_grid.CELL + heatmap_grid.MARGIN) * heatmap_grid.DPI)
    assert grid_size(path)[0] == round(width * heatmap_grid.DPI)
    assert record.heatmaps is None and record.probes is None
    assert "heatmaps" not in row["defense"] and "probes" not in row["defense"]
    written = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    assert "probes" not in written["defense"]
