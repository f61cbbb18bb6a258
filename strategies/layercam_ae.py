"""LayerCAM-AE as a Flower strategy.

Zheng, Yuan, Li, Ni, Tovar, Crowcroft: "A Novel Defense Against Poisoning Attacks on Federated
Learning: LayerCAM Augmented with Autoencoder" (arXiv 2406.02605; extended in ACM TOPS 2025).
Equation numbers are those of the TOPS version (section 4).

Per round, in ``aggregate_train`` (what older Flower called ``aggregate_fit``):
1. LayerCAM heat maps of every upload for the server's probe images (eq. 9-10), all K models in
   one batched pass (``strategies.detection.heatmaps``). Several probes: their maps are concatenated into
   one vector per client, so the AE sees every probe's map.
2. A fresh autoencoder on this round's maps; reconstruction errors R (eq. 11-12).
3. The decision. Default (``decision="evidence"``): each client's signed robust scores of this
   and past rounds, combined with forgetting (``strategies.detection.evidence``), excluded while
   evidence > ``robust_z`` or < -``low_z``, or within a low group. The paper's
   (``decision="voting"``): per-round outliers by its one-sided rule (``threshold="upper"``,
   eq. 13-15) or the robust two-sided rule (``threshold="two-sided"``,
   ``strategies.detection.thresholds``), and a vote every ``window`` rounds
   (eq. 16-17, ``strategies.detection.voting``). Both rules' scores are recorded every round.
4. FedAvg of the kept uploads (eq. 16); the previous global model if none is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from concurrent.futures import wait
from dataclasses import dataclass, fields
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.common import log
from torch import nn
from torch.func import functional_call

from strategies.detection.autoencoder import reconstruction_errors, torch_threads
from strategies.aggregation import clipped_to, weighted_average
from strategies.base import DetectingFedAvg
from strategies.detection.evidence import (EvidenceLedger, SpreadHistory, excluded_by_evidence,
                                           still_held)
from strategies.detection.heatmaps import (
    CamCombine,
    as_tensors,
    class_activation_maps,
    engine_for,
    layercam_combine,
)
from strategies.records import ClientUpload, Detection
from strategies.registry import DEFENSES, ServerAssets
from strategies.detection.thresholds import robust_z, two_sided_rule, upper_rule
from strategies.detection.update_views import (VIEWS_POOL, RoundSums, judge_views,
                                               norm_bound, round_sums)
from strategies.detection.worker_pools import worker_pool
from strategies.detection.voting import OutlierHistory, is_voting_round, vote_malicious
from task.config import (KEYS_BY_NAME, RunConfig, check_layercam_ae_decision,
                         head_view_names)
from task.params import StateColumns, columns_of, update_norms

KEPT_PROBES = 8
"""Probes whose maps ``keep_heatmaps`` hands over at most (the saved grid's columns)."""

_DEFAULTS = RunConfig()
"""The declared defaults of the run-config keys (the paper's settings, section 5.1)."""


@dataclass(frozen=True, kw_only=True)
class LayerCamAeSettings:
    """LayerCAM-AE's detection settings: the run-config keys ``layercam-ae-*`` and ``seed``,
    with their declared defaults (``task.config``). Built directly (tests, benchmarks) they are
    held to the same declarations and rules as the keys, the messages naming the fields."""

    # the heat maps
    target_class: int = _DEFAULTS.layercam_ae_target_class
    """Class c scored; -1 takes each probe's label when ``LayerCamAe`` is given
    ``probe_labels``, else the class the global model predicts for it."""
    map_size: str = _DEFAULTS.layercam_ae_map_size
    """``"native"``: maps at the target layer's resolution (8x8 for the CNN: the information of
    the probe-size map, which is it upsampled, in fewer values, so detection costs less);
    ``"probe"``: upsampled to the probe size, the paper's input (docs/benchmarks.md: both on the
    same rounds)."""
    engine: str = _DEFAULTS.layercam_ae_engine
    """Heat-map engine ``loop`` or ``vmap``; ``auto`` picks by device (vmap on a GPU, the loop
    on a CPU), never by timing: both give the same maps up to rounding, and a choice that
    depended on the machine's load could flip a decision that sits near its cut."""
    threads: int = _DEFAULTS.layercam_ae_threads
    """Intra-op CPU threads of each detection operation (0: torch's setting); one suits these
    small dense problems and keeps detection fast when other processes share the cores."""
    workers: int = _DEFAULTS.layercam_ae_workers
    """Threads that compute the heat maps on a CPU, each on its share of the uploads and its own
    copy of the template (``strategies.detection.heatmaps``), and the update views, each on its
    share of the coordinates (``update_views``): they join once per round, so unlike
    intra-op threads they cost little when the cores are shared. The autoencoder, one sequence
    of small steps, runs on one thread, beside the views' blocks (``autoencoder_and_sums``)."""
    keep_heatmaps: bool = _DEFAULTS.layercam_ae_save_heatmaps
    """Hand the round's maps and their probes (the first ``KEPT_PROBES``) to the harness in
    ``Detection.heatmaps`` and ``Detection.probes`` (key ``layercam-ae-save-heatmaps``)."""
    # the autoencoder (the paper's hidden size, epochs, learning rate and weight decay)
    hidden: int = _DEFAULTS.layercam_ae_hidden
    """Hidden size."""
    epochs: int = _DEFAULTS.layercam_ae_epochs
    """Full-batch Adam epochs."""
    lr: float = _DEFAULTS.layercam_ae_lr
    """Adam's learning rate."""
    weight_decay: float = _DEFAULTS.layercam_ae_weight_decay
    """Adam's weight decay."""
    tolerance: float = _DEFAULTS.layercam_ae_tolerance
    """Stop once the loss has not improved by this relative amount for 10 epochs (0: all
    ``epochs``, the paper's). An early stop reorders the errors against the full run
    (docs/benchmarks.md), so it is off by default."""
    seed: int = _DEFAULTS.seed
    """Seeds the autoencoder's initialisation (plus the round number)."""
    # the decision
    decision: str = _DEFAULTS.layercam_ae_decision
    """``"evidence"``: exclude while the client's evidence over rounds exceeds ``robust_z``
    (or falls below -``low_z``; ``strategies.detection.evidence``); ``"voting"``: the paper's
    per-round rule plus voting."""
    robust_z: float = _DEFAULTS.layercam_ae_robust_z
    """Cut of the robust score (and of the evidence's high side), chosen with
    ``benchmarks/detection_matrix.py`` for native maps (``strategies.detection.evidence``)."""
    memory: float = _DEFAULTS.layercam_ae_memory
    """Forgetting factor of the evidence (0: this round's score alone)."""
    evidence_decay: str = _DEFAULTS.layercam_ae_evidence_decay
    """How a client's evidence fades while it is not sampled: by the rounds it takes part in
    (``"participation"``) or by every round that passes (``"rounds"``)."""
    score_cap: float = _DEFAULTS.layercam_ae_score_cap
    """Each round's score enters the evidence clipped to +-score_cap."""
    scale_rounds: int = _DEFAULTS.layercam_ae_scale_rounds
    """The evidence's scores use the robust spread pooled over this many rounds (1: this
    round's MAD alone)."""
    low_z: float = _DEFAULTS.layercam_ae_low_z
    """The evidence's cut on the low side (``robust_z`` is the high side's)."""
    group_z: float = _DEFAULTS.layercam_ae_group_z
    """Clients whose evidence is between -low_z and -group_z are excluded together when
    there are at least ``group_size`` of them (colluders)."""
    group_size: int = _DEFAULTS.layercam_ae_group_size
    """The fewest clients such a group excludes (0 disables)."""
    hold: bool = _DEFAULTS.layercam_ae_hold
    """A client excluded (by the evidence or the views) stays excluded while its evidence
    stays below -``group_z``."""
    threshold: str = _DEFAULTS.layercam_ae_threshold
    """Per-round rule of ``decision="voting"``: ``"upper"``, the paper's delta = mean + beta *
    std (eq. 13-14); ``"two-sided"``, |R - median| / (1.4826 MAD) > robust_z."""
    beta: float = _DEFAULTS.layercam_ae_beta
    """The paper's beta for ``"upper"``."""
    window: int = _DEFAULTS.layercam_ae_window
    """Voting every xi = ``window`` rounds."""
    votes: int = _DEFAULTS.layercam_ae_votes
    """Malicious with >= epsilon = ``votes`` outlier rounds of the window."""
    # beside the heat maps
    views: tuple[str, ...] = _DEFAULTS.layercam_ae_view_names
    """Views of the updates (``strategies.detection.update_views``), each a robust score per
    client and round (``details["views"]``). An upload with a view score beyond ``view_z`` times
    that view's ``VIEW_TAILS`` factor is excluded in the round it arrives. Empty: the paper's
    heat maps alone."""
    view_z: float = _DEFAULTS.layercam_ae_view_z
    """The views' cut."""
    view_pair: float = _DEFAULTS.layercam_ae_view_pair
    """Two views each beyond this share of their cuts exclude an upload too (``view_excess``)."""
    rejudge: bool = _DEFAULTS.layercam_ae_rejudge
    """Judge the uploads the views exclude a second time, against the uploads they keep, and
    readmit those it clears (``judge_views``)."""
    rejudge_margin: float = _DEFAULTS.layercam_ae_rejudge_margin
    """Only the uploads whose first view excess is at most this are judged again."""
    clip: bool = _DEFAULTS.layercam_ae_clip
    """Clip every kept update to ``norm_bound(updates, clip_z)`` before averaging: the norm a
    benign client at ``clip_z`` robust standard deviations of the round's log norms has."""
    clip_z: float = _DEFAULTS.layercam_ae_clip_z
    """0: the median norm (FLAME's bound)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(self.views))  # a list given stays hashable
        # the keys' own checks (task.config): settings built directly meet a run config's rules
        for field in fields(self):
            KEYS_BY_NAME[self.key_of(field.name)].check(getattr(self, field.name), field.name)
        check_layercam_ae_decision(self.decision, self.threshold, self.votes, self.window,
                                   self.group_z, self.low_z,
                                   prefix="")

    @staticmethod
    def key_of(field: str) -> str:
        """The run-config key a field is read from (``from_config``) and checked by."""
        return {"keep_heatmaps": "layercam-ae-save-heatmaps", "seed": "seed"}.get(
            field, "layercam-ae-" + field.replace("_", "-"))

    @classmethod
    def from_config(cls, config: RunConfig) -> LayerCamAeSettings:
        """The settings of a run config (one ``RunConfig.from_run_config`` has checked): each
        field its key's value (``key_of``), the views as a tuple of names."""
        values = {field.name: getattr(config, cls.key_of(field.name).replace("-", "_"))
                  for field in fields(cls)}
        return cls(**{**values, "views": config.layercam_ae_view_names})

    @property
    def autoencoder(self) -> dict[str, Any]:
        """The autoencoder's parameters (``reconstruction_errors``), bar the seed."""
        return dict(hidden=self.hidden, epochs=self.epochs, lr=self.lr,
                    weight_decay=self.weight_decay, tolerance=self.tolerance)


@DEFENSES.register
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
    settings : LayerCamAeSettings (default: the run config's defaults, the paper's)
        The heat maps', the autoencoder's, the decision's and the views' settings.
    probe_labels : torch.Tensor, optional
        (P,) labels of the server's probes, scored with ``settings.target_class`` = -1. The
        predicted class of an untrained global model is arbitrary: round 1's maps with it
        hardly tell GAE attackers from benign clients, with the probes' labels they do
        (docs/defenses.md). Later rounds, where the model predicts the labels, are unchanged.
    device : torch.device, optional
        Where detection runs; the GPU when present.
    combine : CamCombine
        How activations and gradients form the map (LayerCAM; Grad-CAM-AE passes Grad-CAM's).
    **kwargs
        ``DetectingFedAvg``'s (screening, sampling, ``on_record``).
    """

    name = "layercam-ae"
    checkpointed = ("history", "evidence", "spreads", "held")

    def __init__(
        self,
        *,
        model_fn: Callable[[], nn.Module],
        probes: torch.Tensor,
        target_layer: str,
        settings: LayerCamAeSettings = LayerCamAeSettings(),
        probe_labels: torch.Tensor | None = None,
        device: torch.device | None = None,
        combine: CamCombine = layercam_combine,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.template = model_fn().to(self.device).eval()
        self.template.get_submodule(target_layer)  # fail now on a wrong layer name
        self.head_names = head_view_names(self.template, settings.views)
        """The output layer's parameters (the head-direction view's coordinates)."""
        self.probes = probes.to(self.device)
        self.target_layer = target_layer
        if probe_labels is not None and probe_labels.shape != (len(probes),):
            raise ValueError(f"probe_labels must have shape ({len(probes)},), got "
                             f"{tuple(probe_labels.shape)}")
        self.probe_labels = None if probe_labels is None else probe_labels.to(self.device)
        self.threads = settings.threads if self.device.type == "cpu" else 0
        self.engine = engine_for(self.device) if settings.engine == "auto" else settings.engine
        parallel = self.engine == "loop" and self.device.type == "cpu"
        self.templates = [self.template] + [model_fn().to(self.device).eval()
                                            for _ in range(settings.workers - 1 if parallel else 0)]
        self.combine = combine
        self.history = OutlierHistory(settings.window)
        self.evidence = EvidenceLedger(settings.memory, settings.score_cap,
                                       settings.evidence_decay)
        self.spreads = SpreadHistory(settings.scale_rounds)
        self.held: set[int] = set()
        """Clients excluded (by the evidence or the views) the last round they were scored
        (``hold``)."""

    @classmethod
    def from_config(cls, config: RunConfig, assets: ServerAssets, **kwargs: Any) -> LayerCamAe:
        """Every ``layercam-ae-*`` key (shared by the heat-map baselines) and the server's assets
        (probes, their labels, the model's CAM layer)."""
        return cls(model_fn=assets.model_fn, probes=assets.probes,
                   target_layer=config.layercam_ae_target_layer or assets.cam_layer,
                   settings=LayerCamAeSettings.from_config(config),
                   probe_labels=assets.probe_labels if config.layercam_ae_probe_labels else None,
                   **kwargs)

    def summary(self) -> None:
        super().summary()
        s = self.settings
        rule = (f"evidence (memory {self.evidence.memory:.2f}, cap {self.evidence.cap:.2f}, "
                f"scale over {self.spreads.spreads.maxlen} rounds, z {s.robust_z:.2f} high, "
                f"{s.low_z:.2f} low, groups of {s.group_size} in [-{s.low_z:.2f}, "
                f"-{s.group_z:.2f}))"
                if s.decision == "evidence" else
                f"{s.threshold} (beta {s.beta:.2f}, z {s.robust_z:.2f}), "
                f"vote {s.votes} of {s.window}")
        log(INFO, "\t└──> %s: layer %s, probes %d, decision %s, AE %s, engine %s (%d "
            "thread(s)), device %s", self.name, self.target_layer, len(self.probes), rule,
            s.autoencoder, self.engine, len(self.templates), self.device)

    def probe_classes(self) -> torch.Tensor:
        """Class c per probe (y^c, eq. 9): fixed, the probe's label, or what the current global
        model predicts."""
        if self.settings.target_class >= 0:
            return torch.full((len(self.probes),), self.settings.target_class, device=self.device)
        if self.probe_labels is not None:
            return self.probe_labels
        with torch.no_grad():
            logits = functional_call(self.template, as_tensors(self.global_state, self.device),
                                     (self.probes,))
        return logits.argmax(dim=1)

    def heatmaps(self, uploads: list[ClientUpload]) -> torch.Tensor:
        """(K, P, H, W) maps of the uploads with the configured engine."""
        return class_activation_maps(self.templates, [u.arrays for u in uploads], self.probes,
                                     self.target_layer, self.probe_classes(), self.combine,
                                     self.engine, upsample=self.settings.map_size == "probe")

    def finite_heatmaps(self, uploads: list[ClientUpload]
                        ) -> tuple[torch.Tensor, list[ClientUpload], dict[int, str]]:
        """``heatmaps`` of the uploads whose maps are finite, those uploads, and the others
        rejected with the reason. A finite upload can still make the model's output on the
        probes overflow (weights scaled up layer after layer, a BatchNorm variance near zero):
        its NaN/Inf map would poison the autoencoder every other map trains with."""
        maps = self.heatmaps(uploads)
        finite = torch.isfinite(maps.flatten(1)).all(dim=1).tolist()
        if all(finite):
            return maps, uploads, {}
        rejected = {u.node_id: "heat map is not finite (the model's output on the server's "
                    "probes overflows or is NaN)" for u, ok in zip(uploads, finite) if not ok}
        return (maps[torch.tensor(finite, device=maps.device)],
                [u for u, ok in zip(uploads, finite) if ok], rejected)

    def too_few_finite(self, uploads: list[ClientUpload], rejected: dict[int, str],
                       timings: dict[str, float]) -> Detection | None:
        """No decision (the round keeps the previous model) when the uploads whose heat maps
        are finite are fewer than the round needs: ``min-replies`` and the rule's own minimum,
        which the base checks on the screened uploads, before ``finite_heatmaps`` rejects
        more; else None."""
        needed = max(self.min_replies, self.min_uploads)
        if len(uploads) >= needed:
            return None
        return Detection(kept=[], rejected=rejected, timings=timings, details={
            "skipped": f"{len(uploads)} upload(s) with finite heat maps, fewer than the "
                       f"{needed} needed"})

    def heatmaps_to_keep(self, maps: torch.Tensor) -> dict[str, np.ndarray]:
        """With ``keep_heatmaps``, the ``Detection`` fields that hand the harness the maps
        (K, P, h, w) and the probes they were computed on, the first ``KEPT_PROBES`` of them
        (a bounded artifact whatever ``layercam-ae-probes``); else none."""
        if not self.settings.keep_heatmaps:
            return {}
        return {"heatmaps": maps[:, :KEPT_PROBES].contiguous().cpu().numpy(),
                "probes": self.probes[:KEPT_PROBES].cpu().numpy()}

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        timings: dict[str, float] = {}

        with torch_threads(self.threads):
            start = time.perf_counter()
            maps, uploads, rejected = self.finite_heatmaps(uploads)
            if maps.is_cuda:  # GPU work is asynchronous: time it, not its launch
                torch.cuda.synchronize(maps.device)
            timings["heatmaps"] = time.perf_counter() - start
        too_few = self.too_few_finite(uploads, rejected, timings)
        if too_few is not None:
            return too_few

        start = time.perf_counter()
        errors, epochs, timings["autoencoder"], sums = self.autoencoder_and_sums(
            maps, uploads, server_round)
        beside = time.perf_counter() - start - timings["autoencoder"]  # what the views added
        if not np.isfinite(errors).all():  # finite maps in [0, 1] keep the AE finite; never
            # let it reach the evidence if they did not
            rejected.update({u.node_id: "reconstruction error is not finite"
                             for u, e in zip(uploads, errors) if not np.isfinite(e)})
            keep = np.isfinite(errors)
            maps, errors = maps[torch.from_numpy(keep).to(maps.device)], errors[keep]
            uploads, sums = [u for u, ok in zip(uploads, keep) if ok], None
            if not uploads:
                return Detection(kept=[], rejected=rejected, timings=timings,
                                 details={"skipped": "no finite reconstruction error"})
        node_ids = [u.node_id for u in uploads]

        start = time.perf_counter()
        excess, view_details = self.judge_by_views(uploads, sums)
        flagged = {n for n, r in excess.items() if r > 1.0}
        timings["views"] = beside + time.perf_counter() - start

        start = time.perf_counter()
        s = self.settings
        if s.decision == "evidence":
            kept, scores, rule_details = self.decide_by_evidence(server_round, node_ids, errors,
                                                                 flagged)
            if excess:  # the larger of the heat maps' and the views' score, each to its cut
                scores = {n: s.robust_z * max(scores[n] / s.robust_z, excess[n])
                          for n in node_ids}
        else:  # (the vote's scores are errors: left as they are)
            kept, scores, rule_details = self.decide_by_vote(server_round, node_ids, errors)
        kept = [n for n in kept if n not in flagged]
        timings["decision"] = time.perf_counter() - start

        upper = upper_rule(errors, self.settings.beta)
        details = {
            "decision": self.settings.decision,
            "reconstruction_error": dict(zip(node_ids, errors.tolist())),
            "delta": upper.threshold,
            "upper_scores": dict(zip(node_ids, upper.scores.tolist())),
            "two_sided_scores": dict(zip(node_ids, np.abs(robust_z(errors)).tolist())),
            **rule_details,
            **view_details,
            "engine": self.engine,
            "ae_epochs": epochs,
        }
        return Detection(kept=kept, scores=scores, details=details, timings=timings,
                         rejected=rejected, **self.heatmaps_to_keep(maps))

    def train_autoencoder(self, maps: torch.Tensor, server_round: int
                          ) -> tuple[np.ndarray, int, float]:
        """R (eq. 12) of a fresh autoencoder trained on this round's ``maps``, its epochs and
        its seconds (on whichever thread runs it: the thread count is set there)."""
        start = time.perf_counter()
        with torch_threads(self.threads):
            errors, epochs = reconstruction_errors(
                maps.flatten(1), seed=self.settings.seed + server_round,
                **self.settings.autoencoder)
            errors = errors.cpu().numpy()
        return errors, epochs, time.perf_counter() - start

    def autoencoder_and_sums(self, maps: torch.Tensor, uploads: list[ClientUpload],
                             server_round: int
                             ) -> tuple[np.ndarray, int, float, RoundSums | None]:
        """``train_autoencoder``, and on a CPU with ``workers`` > 1 the views' ``RoundSums``
        beside it: the autoencoder, one sequence of small steps, keeps one core busy, so it runs
        on one of the views' pool's threads (``VIEWS_POOL``) while the views' blocks take the
        pool's other threads (all of them once it ends). Elsewhere the sums are left to
        ``judge_by_views`` (None)."""
        s = self.settings
        if not (s.views and s.workers > 1 and self.device.type == "cpu"):
            return *self.train_autoencoder(maps, server_round), None
        training = worker_pool(VIEWS_POOL, s.workers).submit(self.train_autoencoder, maps,
                                                             server_round)
        try:
            sums = self.update_sums(uploads)
        finally:
            wait([training])  # never leave it running into the next round
        return *training.result(), sums

    def update_sums(self, uploads: list[ClientUpload], gram: bool = True,
                    reference: np.ndarray | None = None) -> RoundSums:
        """The views' sums over the uploads' float arrays, in the model's dtype, a block of
        columns gathered at a time (``StateColumns``, ``round_sums``, on ``workers`` threads);
        ``gram=False``: without the collusion view's Gram matrix; ``reference``: the uploads
        the centre and the ranges are taken over."""
        s = self.settings
        weights = StateColumns([u.arrays for u in uploads], self.global_state)
        return round_sums(weights, outside="outside-range" in s.views,
                          gram=gram and "collusion" in s.views, workers=s.workers,
                          reference=reference,
                          head=columns_of(self.global_state, self.head_names))

    def decide_by_evidence(self, server_round: int, node_ids: list[int], errors: np.ndarray,
                           flagged: Collection[int] = ()
                           ) -> tuple[list[int], dict[int, float], dict]:
        """Keep the clients whose evidence over rounds stays within [-low_z, robust_z], who
        are not in a low group and not held (``strategies.detection.evidence``); the clients
        the views exclude this round (``flagged``) make no group, and are held next round like
        the clients the evidence excludes. ``held`` in the details: the clients the hold alone
        excludes."""
        s = self.settings
        z = self.spreads.scores(errors)
        evidence = self.evidence.update(dict(zip(node_ids, z.tolist())), server_round)
        unheld = excluded_by_evidence(evidence, s.robust_z, s.group_z, s.group_size,
                                      low_cut=s.low_z, out=flagged)
        excluded = unheld | (still_held(evidence, self.held, s.group_z) if s.hold else set())
        # held next round: this round's excluded, by the evidence or the views; the absent
        # keep their state
        self.held = (self.held - evidence.keys()) | excluded | set(flagged)
        kept = [n for n in node_ids if n not in excluded]
        # the score relative to its side's cut, on robust_z's scale: beyond robust_z alone
        low = s.robust_z / s.low_z
        return kept, {n: e if e >= 0 else -e * low for n, e in evidence.items()}, {
            "evidence": evidence, "threshold": s.robust_z, "low_threshold": s.low_z,
            "memory": self.evidence.memory,
            "score_cap": self.evidence.cap, "group_z": s.group_z, "group_size": s.group_size,
            "held": sorted(excluded - unheld - set(flagged)),
            "z": dict(zip(node_ids, z.tolist()))}

    def judge_by_views(self, uploads: list[ClientUpload], sums: RoundSums | None = None
                       ) -> tuple[dict[int, float], dict]:
        """Each upload's view excess (``views``; ``view_excess``): a view score beyond
        ``view_z`` (times the view's tail factor), or two beyond ``view_pair`` of theirs, give
        an excess > 1, and the upload is excluded this round. Empty without views. The details
        hold the views' scores and the clipping bound. ``sums``: the uploads' ``update_sums``
        when the caller has them."""
        s = self.settings
        if not (s.views or s.clip):
            return {}, {"clip_bound": None}
        node_ids = [u.node_id for u in uploads]
        if s.views and sums is None:
            sums = self.update_sums(uploads)
        norms = (sums.norms if sums is not None else
                 update_norms([u.arrays for u in uploads], self.global_state))
        details: dict[str, Any] = {"clip_bound": norm_bound(norms, s.clip_z) if s.clip else None,
                                   "update_norms": dict(zip(node_ids, norms.tolist()))}
        if not s.views:
            return {}, details
        again = ((lambda reference: self.update_sums(uploads, gram=False, reference=reference))
                 if s.rejudge else None)
        views, relative, aside, once = judge_views(sums, s.views, s.view_z, s.view_pair, again,
                                                   s.rejudge_margin)
        excess = dict(zip(node_ids, relative.tolist()))
        details.update({"views": {v: dict(zip(node_ids, z.tolist())) for v, z in views.items()},
                        "view_z": s.view_z, "view_pair": s.view_pair,
                        "flagged_by_views": sorted(n for n, r in excess.items() if r > 1.0),
                        "set_aside_by_views": sorted(n for n, a in zip(node_ids, aside) if a),
                        "first_excess": {n: e for n, e in zip(node_ids, once.tolist()) if e > 1.0}})
        return excess, details

    def new_global_state(self, detection: Detection, kept: list[ClientUpload]
                         ) -> dict[str, np.ndarray]:
        """FedAvg of the kept uploads, each update first clipped to the round's bound (``clip``)
        so that an upload no view caught moves the model no more than a benign client does."""
        bound = detection.details.get("clip_bound")
        if bound is None or self.global_state is None:
            return super().new_global_state(detection, kept)
        return weighted_average(clipped_to(kept, self.global_state, bound,
                                           detection.details["update_norms"]))

    def decide_by_vote(self, server_round: int, node_ids: list[int], errors: np.ndarray
                       ) -> tuple[list[int], dict[int, float], dict]:
        """The paper's decision: this round's outliers, and the vote every ``window`` rounds."""
        s = self.settings
        rule = (upper_rule(errors, s.beta) if s.threshold == "upper"
                else two_sided_rule(errors, s.robust_z))
        outlier = {n: not b for n, b in zip(node_ids, rule.benign)}
        self.history.record(server_round, outlier)
        voting = is_voting_round(server_round, s.window)
        malicious = (
            vote_malicious(self.history.flags, server_round, s.window, s.votes, node_ids)
            if voting else {}
        )
        kept = [n for n in node_ids if (n not in malicious if voting else not outlier[n])]
        return kept, dict(zip(node_ids, rule.scores.tolist())), {
            "rule": s.threshold, "threshold": rule.threshold, "outlier": outlier,
            "voting_round": voting, "votes": malicious}

