"""The LayerCAM-AE paper's heat-map baselines, built from LayerCAM-AE's own parts.

- **GradCAM-AE**: Grad-CAM maps (Selvaraju et al., ICCV 2017: channel weights = spatially
  averaged gradients) instead of LayerCAM's, into the same autoencoder, outlier rule and vote.
- **LayerCAM-Krum**: LayerCAM maps scored by Krum (Blanchard et al., NeurIPS 2017) instead of
  the autoencoder: the n - f maps with the lowest Krum scores are kept (Multi-Krum on heat maps).
  Assumes at most f attackers.
"""

from __future__ import annotations

import time

from strategies.detection.autoencoder import torch_threads
from strategies.detection.heatmaps import gradcam_combine
from strategies.layercam_ae import LayerCamAe
from strategies.records import ClientUpload, Detection
from strategies.registry import DEFENSES
from strategies.robust import check_krum_f
from strategies.detection.robust_math import krum_scores, krum_select


@DEFENSES.register
class GradCamAe(LayerCamAe):
    """LayerCAM-AE with Grad-CAM heat maps."""

    name = "gradcam-ae"

    def __init__(self, **kwargs) -> None:
        super().__init__(combine=gradcam_combine, **kwargs)


@DEFENSES.register
class LayerCamKrum(LayerCamAe):
    """Multi-Krum over the uploads' LayerCAM heat maps (module docstring)."""

    name = "layercam-krum"

    def __init__(self, *, num_malicious: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        return super().from_config(config, assets, num_malicious=check_krum_f(config),
                                   **flower_kwargs)

    @property
    def min_uploads(self) -> int:  # type: ignore[override]
        """Krum's n >= 2f + 3 (``MultiKrum.min_uploads``)."""
        return 2 * self.num_malicious + 3

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        with torch_threads(self.threads):
            maps, uploads, rejected = self.finite_heatmaps(uploads)
        vectors = maps.flatten(1).double().cpu().numpy()
        timings["heatmaps"] = time.perf_counter() - start
        too_few = self.too_few_finite(uploads, rejected, timings)  # Krum's n >= 2f + 3
        if too_few is not None:
            return too_few
        start = time.perf_counter()
        scores = krum_scores(vectors, self.num_malicious)
        chosen = krum_select(vectors, self.num_malicious, max(1, len(uploads) - self.num_malicious),
                             scores)
        timings["decision"] = time.perf_counter() - start
        return Detection(kept=[uploads[i].node_id for i in chosen],
                         scores={u.node_id: float(s) for u, s in zip(uploads, scores)},
                         details={"f": self.num_malicious, "engine": self.engine}, timings=timings,
                         rejected=rejected, **self.heatmaps_to_keep(maps))
