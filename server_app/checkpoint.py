"""Checkpoints of a run and resuming from one (run-config key ``resume-from``).

After every round the harness saves, in the run's results folder, what the rest of the run
depends on: the global model, the defense's state carried between rounds
(``DetectingFedAvg.checkpoint_state``: LayerCAM-AE's evidence, spreads, votes and held
clients, the nodes seen), the detection log, and the server's random generators. A resumed run
restores them and goes on from the next round in the same folder, so that it ends as the
uninterrupted run would.

A checkpoint is data, never code: it holds tensors and plain Python values only (dicts, lists,
tuples, sets, numbers, strings), and is read with ``torch.load(weights_only=True)``, which
refuses anything else. What is not plain is converted on save (``to_plain``: numpy arrays,
deques, the defense's helper objects as their attributes) and back on load (``from_plain``),
where a helper object's attributes are put on a copy of the freshly built defense's own object,
so that no class is ever looked up by a name read from the file. A damaged checkpoint, one of an
earlier (pickled) version, or one that does not fit the model or the defense gives one
``ConfigError`` line naming the file and what is wrong.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections import deque
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common import log

from server_app.results import CHECKPOINT, ResultsWriter, RoundLog
from strategies.base import DetectingFedAvg
from task.config import ConfigError, RunConfig

RESUMABLE_CHANGES = ("resume-from", "num-server-rounds", "round-timeout", "node-wait-timeout",
                     "results-dir")
"""Run-config keys a resumed run may set differently from the run it resumes (more rounds,
other timeouts); any other difference would make the resumed run a different experiment."""

FORMAT = "layercam-ae-fl checkpoint"
VERSION = 2
"""Version 1 pickled the state (loading it could run code); version 2 holds plain data."""
TAG = "__type__"
"""The key that marks a converted value (``to_plain``); no dict of the state may use it."""
NUMERIC_KINDS = "biufc"
"""numpy dtype kinds a checkpoint may hold (bool, integers, floats, complex: no objects)."""
PARTS = ("round", "arrays", "strategy", "log", "rng")


class Damaged(ValueError):
    """A checkpoint's content is not what this version writes; the message says where."""


def to_plain(value: Any) -> Any:
    """``value`` as tensors and plain data that ``torch.load(weights_only=True)`` reads back.

    numpy arrays become ``{TAG: "ndarray"}`` (dtype, shape, bytes), numpy scalars Python
    numbers, deques ``{TAG: "deque"}``, and an object with attributes ``{TAG: "object"}`` (its
    class's name, checked on load, and its attributes). ``TypeError`` for anything else."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"cannot checkpoint a numpy array of dtype {value.dtype}")
        data = np.asarray(value, order="C")  # a 0-d array stays 0-d
        return {TAG: "ndarray", "dtype": data.dtype.str, "shape": list(data.shape),
                "data": torch.from_numpy(np.frombuffer(data.tobytes(), dtype=np.uint8).copy())}
    if isinstance(value, deque):
        return {TAG: "deque", "items": [to_plain(v) for v in value], "maxlen": value.maxlen}
    if type(value) is dict:
        if TAG in value:
            raise TypeError(f"cannot checkpoint a dict with the key {TAG!r}")
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if type(value) in (list, tuple, set):
        return type(value)(to_plain(v) for v in value)
    if hasattr(value, "__dict__") and not callable(value):
        return {TAG: "object", "class": class_name(value), "attrs": to_plain(vars(value))}
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def class_name(value: Any) -> str:
    """``module.QualifiedName`` of ``value``'s class (what an object's state is checked by)."""
    return f"{type(value).__module__}.{type(value).__qualname__}"


_NO_TEMPLATE = object()


def from_plain(value: Any, template: Any = _NO_TEMPLATE, where: str = "") -> Any:
    """Undo ``to_plain``. ``template`` is the current value of the same place in the freshly
    built defense: an object's attributes go onto a copy of it, and each value must be of its
    template's kind. ``Damaged`` says where the content does not fit."""
    if isinstance(value, dict) and TAG in value:
        kind = value[TAG]
        if kind == "ndarray":
            return _ndarray(value, where)
        if kind == "deque":
            template_items = template if isinstance(template, deque) else ()
            items = [from_plain(v, _first(template_items), f"{where}[{i}]")
                     for i, v in enumerate(value["items"])]
            return deque(items, maxlen=value["maxlen"])
        if kind == "object":
            return _object(value, template, where)
        raise Damaged(f"{where}: unknown {TAG} {kind!r}")
    if isinstance(value, dict):
        children = template if isinstance(template, Mapping) else {}
        return {k: _checked(from_plain(v, children.get(k, _NO_TEMPLATE), f"{where}.{k}"),
                            children.get(k, _NO_TEMPLATE), f"{where}.{k}")
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return type(value)(from_plain(v, _NO_TEMPLATE, f"{where}[]") for v in value)
    return value


def _first(items: Any) -> Any:
    """The first of ``items`` as the template of every item (``_NO_TEMPLATE`` if empty)."""
    return next(iter(items), _NO_TEMPLATE)


def _ndarray(value: dict, where: str) -> np.ndarray:
    """A numpy array saved by ``to_plain``: numeric dtypes only, its bytes matching its shape."""
    dtype = np.dtype(value["dtype"])
    if dtype.kind not in NUMERIC_KINDS:
        raise Damaged(f"{where}: an array of dtype {dtype} (only numbers are read)")
    data = value["data"]
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise Damaged(f"{where}: an array whose data is not bytes")
    return np.frombuffer(data.numpy().tobytes(), dtype=dtype).reshape(value["shape"]).copy()


def _object(value: dict, template: Any, where: str) -> Any:
    """A copy of ``template`` (the defense's own object) carrying the saved attributes; the
    saved class must be the template's, and the attributes exactly its attributes."""
    if template is _NO_TEMPLATE or not hasattr(template, "__dict__"):
        raise Damaged(f"{where}: holds a {value['class']} the defense does not have")
    if value["class"] != class_name(template):
        raise Damaged(f"{where}: holds a {value['class']}, the defense a {class_name(template)}")
    saved, own = value["attrs"], vars(template)
    if not isinstance(saved, dict) or saved.keys() != own.keys():
        raise Damaged(f"{where}: attributes {sorted(saved) if isinstance(saved, dict) else saved}"
                      f" where {class_name(template)} has {sorted(own)}")
    restored = copy.copy(template)
    for name, plain in saved.items():
        setattr(restored, name, _checked(from_plain(plain, own[name], f"{where}.{name}"),
                                         own[name], f"{where}.{name}"))
    return restored


KINDS = (bool, (int, float), str, bytes, dict, list, tuple, set, deque, np.ndarray, torch.Tensor)


def _kind(value: Any) -> Any:
    """The kind a restored value must share with its template (ints and floats are one)."""
    return next((kind for kind in KINDS if isinstance(value, kind)), type(value))


def _checked(value: Any, template: Any, where: str) -> Any:
    """``value`` if it is of ``template``'s kind (or either is absent/None), else ``Damaged``."""
    if template is _NO_TEMPLATE or template is None or value is None:
        return value
    if _kind(value) != _kind(template):
        raise Damaged(f"{where}: a {type(value).__name__} where the defense keeps a "
                      f"{type(template).__name__}")
    return value


def checkpoint_content(server_round: int, arrays: ArrayRecord, strategy: DetectingFedAvg,
                       round_log: RoundLog) -> dict[str, Any]:
    """What a checkpoint file holds after ``server_round``, as plain data (``to_plain``)."""
    return {
        "format": FORMAT, "version": VERSION, "round": server_round,
        "arrays": {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()},
        "strategy": to_plain(strategy.checkpoint_state()),
        "log": to_plain(round_log.checkpoint_state()),
        "rng": to_plain({"python": random.getstate(), "numpy": np.random.get_state(),
                         "torch": torch.get_rng_state()})}


def save_checkpoint(writer: ResultsWriter, server_round: int, arrays: ArrayRecord,
                    strategy: DetectingFedAvg, round_log: RoundLog) -> None:
    """The state after ``server_round``, atomically replacing the previous checkpoint."""
    writer.save_checkpoint(checkpoint_content(server_round, arrays, strategy, round_log))


def read_checkpoint(raw: Any, model_state: Mapping[str, torch.Tensor],
                    strategy: DetectingFedAvg) -> dict[str, Any]:
    """The checkpoint ``raw`` (as loaded) with its state converted back, checked against the
    model's state dict and the freshly built ``strategy``; ``Damaged`` says what is wrong."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise Damaged("not a checkpoint of this product (no 'format' entry)")
    if raw.get("version") != VERSION:
        raise Damaged(f"checkpoint version {raw.get('version')!r}: this version reads {VERSION}")
    missing = [part for part in PARTS if part not in raw]
    if missing:
        raise Damaged(f"incomplete: no {missing}")
    if type(raw["round"]) is not int or raw["round"] < 1:
        raise Damaged(f"round {raw['round']!r} is not a round number")
    check_arrays(raw["arrays"], model_state)
    own = strategy.checkpoint_state()
    if not (isinstance(raw["strategy"], dict) and raw["strategy"].keys() == own.keys()):
        saved = sorted(raw["strategy"]) if isinstance(raw["strategy"], dict) else raw["strategy"]
        raise Damaged(f"strategy: state {saved} where {strategy.name} keeps {sorted(own)}")
    state = from_plain(raw["strategy"], own, "strategy")
    participants = state.get("participants")
    if not (isinstance(participants, set) and all(type(n) is int for n in participants)):
        raise Damaged("strategy: no set of participant node ids")
    round_log = from_plain(raw["log"], _NO_TEMPLATE, "log")
    check_log(round_log)
    rng = from_plain(raw["rng"], _NO_TEMPLATE, "rng")
    check_rng(rng)
    return {"round": raw["round"], "arrays": raw["arrays"], "strategy": state,
            "log": round_log, "rng": rng}


def check_arrays(arrays: Any, model_state: Mapping[str, torch.Tensor]) -> None:
    """``Damaged`` unless ``arrays`` are tensors with the model's keys, shapes and dtypes."""
    if not (isinstance(arrays, dict)
            and all(isinstance(v, torch.Tensor) for v in arrays.values())):
        raise Damaged("arrays: not a dict of tensors")
    if arrays.keys() != model_state.keys():
        extra = sorted(map(str, arrays.keys() - model_state.keys()))
        absent = sorted(model_state.keys() - arrays.keys())
        raise Damaged(f"arrays do not fit the model: unknown {extra[:5]}, missing {absent[:5]}")
    for key, expected in model_state.items():
        got = arrays[key]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            raise Damaged(f"arrays[{key!r}] is {got.dtype} {tuple(got.shape)}, the model's "
                          f"{expected.dtype} {tuple(expected.shape)}")


def check_log(state: Any) -> None:
    """``Damaged`` unless ``state`` is a ``RoundLog.checkpoint_state``: a finite elapsed time,
    and decisions ``(truth {node: bool}, removed {node}, scores {node: number} | None)``."""
    if not (isinstance(state, dict) and state.keys() == {"elapsed", "decisions"}):
        raise Damaged("log: not a detection log")
    elapsed = state["elapsed"]
    if type(elapsed) not in (int, float) or not math.isfinite(elapsed) or elapsed < 0:
        raise Damaged(f"log: elapsed {elapsed!r}")
    if not isinstance(state["decisions"], list):
        raise Damaged("log: decisions are not a list")
    for i, decision in enumerate(state["decisions"]):
        if not (isinstance(decision, tuple) and len(decision) == 3
                and _mapping_of(decision[0], (bool,))
                and isinstance(decision[1], set) and all(type(n) is int for n in decision[1])
                and (decision[2] is None or _mapping_of(decision[2], (int, float)))):
            raise Damaged(f"log: decision {i} is not (truth, removed, scores)")


def _mapping_of(value: Any, types: tuple[type, ...]) -> bool:
    """Whether ``value`` maps node ids (ints) to values of ``types``."""
    return isinstance(value, dict) and all(
        type(k) is int and type(v) in types for k, v in value.items())


def check_rng(rng: Any) -> None:
    """``Damaged`` unless ``rng`` holds states that python's, numpy's and torch's generators
    accept (tried on fresh generators, so the process's own are untouched)."""
    if not (isinstance(rng, dict) and rng.keys() == {"python", "numpy", "torch"}):
        raise Damaged("rng: not the python, numpy and torch generator states")
    try:
        random.Random().setstate(rng["python"])
        np.random.RandomState().set_state(rng["numpy"])
        torch.Generator().set_state(rng["torch"])
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        raise Damaged(f"rng: a state the generators refuse ({err})") from err


def read_saved_config(path: Path) -> dict[str, Any]:
    """The run config a results folder recorded (``config.json``); ``ConfigError`` naming it."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"resume-from: cannot read {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise ConfigError(f"resume-from: {path} is not JSON ({err})") from err
    if not isinstance(saved, dict):
        raise ConfigError(f"resume-from: {path} holds no run config")
    return saved


def open_resumed_run(config: RunConfig, model_state: Mapping[str, torch.Tensor],
                     strategy: DetectingFedAvg) -> tuple[ResultsWriter, dict[str, Any]]:
    """The writer and checkpoint of the run ``resume-from`` names, the checkpoint checked
    against the model's ``model_state`` and the freshly built ``strategy``; its config.json
    then records this run's config. ``ConfigError``, one line naming the file, when the folder
    has no readable checkpoint or rows, or was run with a different config."""
    path = Path(config.resume_from).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"resume-from={config.resume_from!r}: no such folder")
    saved = read_saved_config(path / "config.json")
    current = config.to_run_config()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ConfigError(f"resume-from={config.resume_from!r} was run with other values of "
                          f"{changed}: resume with the same run config")
    raw = ResultsWriter(path).load_checkpoint()
    try:
        checkpoint = read_checkpoint(raw, model_state, strategy)
    except (Damaged, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        what = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"resume-from: {path / CHECKPOINT}: {what}") from err
    if checkpoint["round"] > config.num_server_rounds:
        raise ConfigError(f"num-server-rounds={config.num_server_rounds} but the run to resume "
                          f"has finished {checkpoint['round']} rounds")
    writer = ResultsWriter.reopen(path, checkpoint["round"])
    writer.write_config(current)  # the resumed run's config (more rounds, other timeouts)
    return writer, checkpoint


def restore(checkpoint: dict[str, Any], strategy: DetectingFedAvg,
            connected: set[int]) -> ArrayRecord:
    """Put the strategy's state and the random generators back; return the global model.

    Per-client state is keyed by Flower node id: when none of the checkpoint's nodes is
    ``connected`` (a restarted simulation, whose nodes Flower numbers anew), it starts afresh."""
    if checkpoint["strategy"]["participants"] & connected:
        strategy.restore_state(checkpoint["strategy"])
    else:
        log(WARNING, "None of the resumed run's node ids is connected: the defense's "
            "per-client state starts afresh")
    rng = checkpoint["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return ArrayRecord({k: Array(v.numpy()) for k, v in checkpoint["arrays"].items()})
