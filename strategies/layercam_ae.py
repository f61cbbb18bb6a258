"""LayerCAM-AE as a Flower strategy.

Zheng, Yuan, Li, Ni, Tovar, Crowcroft: "A Novel Defense Against Poisoning Attacks on Federated
Learning: LayerCAM Augmented with Autoencoder" (arXiv 2406.02605; extended in ACM TOPS 2025).
Equation numbers are those of the TOPS version (section 4).

Per round, in ``aggregate_train`` (what older Flower called ``aggregate_fit``):
1. LayerCAM heat maps of every upload for the server's probe images (eq. 9-10), all K models in
   one batched pass (``strategies.heatmaps``). Several probes: their maps are concatenated into
   one vector per client, so the AE sees every probe's map.
2. A fresh autoencoder on this round's maps; reconstruction errors R (eq. 11-12).
3. Outliers: the paper's one-sided rule (``threshold="upper"``, eq. 13-15) or the robust
   two-sided rule (``threshold="two-sided"``), see ``strategies.thresholds``.
4. Voting every ``window`` rounds (eq. 16-17, ``strategies.voting``).
5. FedAvg of the kept uploads (eq. 16); the previous global model if none is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

import numpy as np
import torch
from flwr.common import log
from torch import nn
from torch.func import functional_call

from strategies.autoencoder import reconstruction_errors, torch_threads
from strategies.base import DetectingFedAvg
from strategies.heatmaps import (CamCombine, as_tensors, class_activation_maps, engine_for,
                                 layercam_combine)
from strategies.records import ClientUpload, Detection
from strategies.thresholds import two_sided_rule, upper_rule
from strategies.voting import OutlierHistory, is_voting_round, vote_malicious


class LayerCamAe(DetectingFedAvg):
    """LayerCAM-AE: drop uploads whose heat maps the autoencoder finds anomalous.

    Parameters
    ----------
    model_fn : Callable[[], nn.Module]
        Builds the run's architecture; used as a template, uploads are loaded functionally.
    probes : torch.Tensor
        (P, C, H, W) server-held images the heat maps are computed for.
    target_layer : str
        Dotted module name whose activations LayerCAM reads (default of the CNN: ``conv2``).
    target_class : int (default: -1)
        Class c scored; -1 takes the class the global model predicts for each probe.
    threshold : str (default: "two-sided")
        ``"upper"``: the paper's delta = mean + beta * std (eq. 13-14); ``"two-sided"``:
        |R - median| / (1.4826 MAD) > robust_z.
    beta : float (default: 1.0)
        The paper's beta for ``"upper"``.
    robust_z : float (default: 2.5)
        Cut of the two-sided robust score (chosen by ``benchmarks/compare_rules.py``).
    window, votes : int (default: 3, 2)
        Voting every xi = ``window`` rounds; malicious with >= epsilon = ``votes`` outlier rounds.
    hidden, epochs, lr, weight_decay
        Autoencoder: hidden size 128, 200 full-batch Adam epochs, lr 1e-3, weight decay 1e-5.
    tolerance : float (default: 0.0)
        Stop the AE once its loss has not improved by this relative amount for 10 epochs
        (0: all ``epochs``, the paper's).
    map_size : str (default: "probe")
        ``"probe"``: maps upsampled to the probe size (the paper's); ``"native"``: at the target
        layer's resolution, which holds the same information in far fewer values.
    threads : int (default: 1)
        CPU threads for detection (0: torch's setting); one suits these small dense problems
        and keeps detection fast when other processes share the cores.
    engine : str (default: "auto")
        Heat-map engine ``loop`` or ``vmap``; ``auto`` picks by device (vmap on a GPU, the loop
        on a CPU), never by timing: both give the same maps to 1e-6, and a choice that depended
        on the machine's load could flip a decision that sits near its cut.
    keep_heatmaps : bool (default: False)
        Keep the round's maps (first probe) in ``last_heatmaps`` for the harness to save.
    seed : int
        Seeds the autoencoder initialisation (plus the round number).
    device : torch.device, optional
        Where detection runs; the GPU when present.
    combine : CamCombine
        How activations and gradients form the map (LayerCAM; Grad-CAM-AE passes Grad-CAM's).
    """

    name = "layercam-ae"

    def __init__(
        self,
        *,
        model_fn: Callable[[], nn.Module],
        probes: torch.Tensor,
        target_layer: str,
        target_class: int = -1,
        threshold: str = "two-sided",
        beta: float = 1.0,
        robust_z: float = 2.5,
        window: int = 3,
        votes: int = 2,
        hidden: int = 128,
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        tolerance: float = 0.0,
        map_size: str = "probe",
        threads: int = 1,
        engine: str = "auto",
        keep_heatmaps: bool = False,
        seed: int = 0,
        device: torch.device | None = None,
        combine: CamCombine = layercam_combine,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if threshold not in ("upper", "two-sided"):
            raise ValueError(f"threshold must be 'upper' or 'two-sided', got {threshold!r}")
        if votes > window:
            raise ValueError(f"votes ({votes}) must be <= window ({window})")
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.template = model_fn().to(self.device).eval()
        self.template.get_submodule(target_layer)  # fail now on a wrong layer name
        self.probes = probes.to(self.device)
        self.target_layer = target_layer
        self.target_class = target_class
        self.threshold = threshold
        self.beta = beta
        self.robust_z = robust_z
        self.window = window
        self.votes = votes
        if map_size not in ("probe", "native"):
            raise ValueError(f"map_size must be 'probe' or 'native', got {map_size!r}")
        self.ae_params = dict(hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay,
                              tolerance=tolerance)
        self.map_size = map_size
        self.threads = threads if self.device.type == "cpu" else 0
        if engine not in ("auto", "loop", "vmap"):
            raise ValueError(f"engine must be 'auto', 'loop' or 'vmap', got {engine!r}")
        self.engine = engine_for(self.device) if engine == "auto" else engine
        self.keep_heatmaps = keep_heatmaps
        self.seed = seed
        self.combine = combine
        self.history = OutlierHistory(window)
        self.last_heatmaps: np.ndarray | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> %s: layer %s, probes %d, rule %s (beta %.2f, z %.2f), vote %d of %d, "
            "AE %s, engine %s, device %s", self.name, self.target_layer, len(self.probes),
            self.threshold, self.beta, self.robust_z, self.votes, self.window, self.ae_params,
            self.engine, self.device)

    def probe_classes(self) -> torch.Tensor:
        """Class c per probe: fixed, or what the current global model predicts (y^c, eq. 9)."""
        if self.target_class >= 0:
            return torch.full((len(self.probes),), self.target_class, device=self.device)
        with torch.no_grad():
            logits = functional_call(self.template, as_tensors(self.global_state, self.device),
                                     (self.probes,))
        return logits.argmax(dim=1)

    def heatmaps(self, uploads: list[ClientUpload]) -> torch.Tensor:
        """(K, P, H, W) maps of the uploads with the configured engine."""
        return class_activation_maps(self.template, [u.arrays for u in uploads], self.probes,
                                     self.target_layer, self.probe_classes(), self.combine,
                                     self.engine, upsample=self.map_size == "probe")

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        timings: dict[str, float] = {}
        node_ids = [u.node_id for u in uploads]

        with torch_threads(self.threads):
            start = time.perf_counter()
            maps = self.heatmaps(uploads)
            timings["heatmaps"] = time.perf_counter() - start

            start = time.perf_counter()
            errors, epochs = reconstruction_errors(
                maps.flatten(1), seed=self.seed + server_round, **self.ae_params)
            errors = errors.cpu().numpy()
            timings["autoencoder"] = time.perf_counter() - start

        start = time.perf_counter()
        upper = upper_rule(errors, self.beta)
        two_sided = two_sided_rule(errors, self.robust_z)
        decision = upper if self.threshold == "upper" else two_sided
        outlier = {n: not b for n, b in zip(node_ids, decision.benign)}
        self.history.record(server_round, outlier)
        voting = is_voting_round(server_round, self.window)
        malicious = (
            vote_malicious(self.history.flags, server_round, self.window, self.votes, node_ids)
            if voting else {}
        )
        kept = [n for n in node_ids if (n not in malicious if voting else not outlier[n])]
        timings["decision"] = time.perf_counter() - start

        if self.keep_heatmaps:
            self.last_heatmaps = maps[:, 0].cpu().numpy()
        details = {
            "rule": self.threshold,
            "reconstruction_error": dict(zip(node_ids, errors.tolist())),
            "delta": upper.threshold,
            "upper_scores": dict(zip(node_ids, upper.scores.tolist())),
            "two_sided_scores": dict(zip(node_ids, two_sided.scores.tolist())),
            "threshold": decision.threshold,
            "outlier": outlier,
            "voting_round": voting,
            "votes": malicious,
            "engine": self.engine,
            "ae_epochs": epochs,
        }
        return Detection(kept=kept, scores=dict(zip(node_ids, decision.scores.tolist())),
                         details=details, timings=timings)
