"""The picture of one round's heat maps (``layercam-ae-save-heatmaps``): each client's map for
each probe laid over that probe, so that a reader sees where in the image the model looks.

One row per client (sorted by node id), one column per probe, and a first row with the probes
alone. A cell is the probe in grey at its own resolution (e.g. 28x28, shown with nearest
upscaling), with the map upsampled bilinearly to that resolution, scaled to [0, 1] as LayerCAM's
visualisation does (``strategies.detection.heatmaps.finish_maps``), coloured (jet) and blended in with an
opacity proportional to the map: where the map is 0 the probe shows as it is. Clients the round
excluded are framed in red; those the harness knows attacked are labelled so.

The picture stays small with many clients: it draws the first ``MAX_ROWS`` clients by node id
and every excluded or attacking one (at most ``MAX_ROWS`` of these too), and says so in its
title. Pure functions, no I/O: ``server_app.results`` saves the figure.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

MAX_ROWS = 16
"""Clients drawn at most among the first by node id, and at most among the marked ones."""

ALPHA = 0.6
"""Opacity of the colour where a map is at its maximum (at 0 the probe shows alone)."""

CMAP = "jet"
"""The colour map of pytorch-grad-cam's ``show_cam_on_image`` (blue low, red high)."""

DPI = 100
CELL = 1.0
"""Inches per cell, each way (100 pixels at ``DPI``)."""
LABEL = 1.5
"""Inches of the row labels' column on the left."""
TITLE = 0.75
"""Inches of the title above the cells."""
MARGIN = 0.25
"""Inches right of and below the cells."""
MIN_COLUMNS = 4
"""Cells' width the figure has at least, so that the title fits beside few probes."""


def grey_image(probe: np.ndarray) -> np.ndarray:
    """A (C, H, W) probe as one (H, W) grey image in [0, 1]: the mean of its channels, scaled
    to [0, 1] (the server's probes are standardised; a constant image is black)."""
    grey = np.asarray(probe, dtype=np.float64).reshape(-1, *np.shape(probe)[-2:]).mean(axis=0)
    grey = grey - grey.min()
    top = grey.max()
    return grey / top if top > 0 else grey


def upsampled_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) heat map upsampled bilinearly to ``size`` and scaled to [0, 1], as LayerCAM's
    pipeline does it (``finish_maps``: ReLU, scale, upsample, scale)."""
    import torch

    from strategies.detection.heatmaps import finish_maps

    return finish_maps(torch.as_tensor(np.asarray(cam, dtype=np.float32)),
                       tuple(size)).double().numpy()


def overlay(grey: np.ndarray, cam: np.ndarray, alpha: float = ALPHA,
            cmap: str = CMAP) -> np.ndarray:
    """One cell: the (H, W) grey probe in [0, 1] with ``cam`` (h, w) upsampled to H x W
    (``upsampled_map``), coloured by ``cmap`` and blended with opacity ``alpha`` times the map,
    pixel by pixel. (H, W, 3) RGB in [0, 1]; where the map is 0 the probe is unchanged."""
    import matplotlib

    heat = upsampled_map(cam, grey.shape)
    colour = matplotlib.colormaps[cmap](heat)[..., :3]
    weight = alpha * heat[..., None]
    return (1.0 - weight) * np.asarray(grey, dtype=np.float64)[..., None] + weight * colour


def rows_to_draw(node_ids: Sequence[int], marked: set[int], limit: int = MAX_ROWS) -> list[int]:
    """Indices into ``node_ids`` of the clients drawn, in node-id order: the first ``limit`` by
    node id and the first ``limit`` of the ``marked`` ones (excluded or attacking)."""
    order = sorted(range(len(node_ids)), key=lambda i: node_ids[i])
    chosen = set(order[:limit]) | set([i for i in order if node_ids[i] in marked][:limit])
    return [i for i in order if i in chosen]


def figure_inches(rows: int, columns: int) -> tuple[float, float]:
    """Width and height of a grid of ``rows`` clients (plus the probes' row) by ``columns``
    probes."""
    return (LABEL + max(columns, MIN_COLUMNS) * CELL + MARGIN,
            TITLE + (rows + 1) * CELL + MARGIN)


SHORT_DIGITS = 5
"""Last digits of a node id its row's label shows at least (Flower's ids are up to 64-bit)."""


def short_ids(node_ids: Sequence[int]) -> list[str]:
    """Labels for the drawn rows' ``node_ids``: ids below 10^``SHORT_DIGITS`` as they are, the
    others by their last digits, as many as tell every label apart (at least
    ``SHORT_DIGITS``)."""
    for digits in itertools.count(SHORT_DIGITS):
        labels = [str(n) if n < 10 ** digits else f"…{n % 10 ** digits:0{digits}d}"
                  for n in node_ids]
        if len(set(labels)) == len(set(node_ids)):
            return labels
    raise AssertionError("unreachable: the full ids tell distinct ids apart")


def heatmap_figure(server_round: int, maps: np.ndarray, probes: np.ndarray,
                   node_ids: Sequence[int], excluded: set[int],
                   attackers: set[int] = frozenset(), defense: str = "LayerCAM"):
    """The grid as a matplotlib ``Figure`` (no pyplot: nothing global to close).

    ``maps`` is (K, P, h, w): client k's map for probe p, at any resolution; ``probes`` (P, C,
    H, W) the images they were computed on; ``node_ids`` the K clients in the maps' order;
    ``excluded`` those the round excluded; ``attackers`` those known to attack (empty when
    the harness has no ground truth)."""
    from matplotlib.figure import Figure

    maps = np.asarray(maps)
    if maps.ndim == 3:  # one probe
        maps = maps[:, None]
    probes = np.asarray(probes)
    if len(maps) != len(node_ids) or maps.shape[1] != len(probes):
        raise ValueError(f"{maps.shape[0]} clients x {maps.shape[1]} probes of maps, for "
                         f"{len(node_ids)} node ids and {len(probes)} probes")
    rows = rows_to_draw(node_ids, set(excluded) | set(attackers))
    columns = len(probes)
    width, height = figure_inches(len(rows), columns)
    fig = Figure(figsize=(width, height), dpi=DPI)
    greys = [grey_image(p) for p in probes]

    def cell(row: int, column: int):
        gap = 0.05
        left = (LABEL + column * CELL + gap) / width
        bottom = (height - TITLE - (row + 1) * CELL + gap) / height
        ax = fig.add_axes((left, bottom, (CELL - 2 * gap) / width, (CELL - 2 * gap) / height))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    def label(row: int, text: str, colour: str = "black") -> None:
        fig.text((LABEL - 0.1) / width, (height - TITLE - (row + 0.5) * CELL) / height, text,
                 ha="right", va="center", fontsize=8, color=colour)

    for column, grey in enumerate(greys):
        ax = cell(0, column)
        ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"probe {column + 1}", fontsize=7, pad=2)
    label(0, "probes")
    labels = short_ids([node_ids[k] for k in rows])
    for row, k in enumerate(rows, start=1):
        node_id = node_ids[k]
        out = node_id in excluded
        roles = [r for r, on in (("attacker", node_id in attackers), ("excluded", out)) if on]
        label(row, "\n".join([labels[row - 1], ", ".join(roles)]).strip(),
              "red" if out else "black")
        for column, grey in enumerate(greys):
            ax = cell(row, column)
            ax.imshow(overlay(grey, maps[k, column]), interpolation="nearest")
            if out:
                for spine in ax.spines.values():
                    spine.set_color("red")
                    spine.set_linewidth(2)
    shown = (f"{len(node_ids)} clients" if len(rows) == len(node_ids) else
             f"{len(rows)} of {len(node_ids)} clients: the first {MAX_ROWS} by node id and the "
             f"excluded or attacking ones")
    (h, w), (height_px, width_px) = maps.shape[-2:], probes.shape[-2:]
    fig.suptitle(f"{defense} heat maps over the probes, round {server_round}\n{shown}\n"
                 f"{h}x{w} maps upsampled to {height_px}x{width_px}; red frame: excluded this "
                 "round", fontsize=8,
                 y=1 - 0.1 / height, va="top")
    return fig
