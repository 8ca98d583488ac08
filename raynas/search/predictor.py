"""A latency predictor for one space under one measurement setting: an MLP and a FLOPs-linear baseline.

Search filters thousands of candidate archs by a latency budget; timing each
would cost far more than the search itself, so HAT and AutoTinyBERT fit a small
regressor on measured archs and ask it instead. Two models are fitted on the
same measured archs and judged on the same held-out archs:

* ``mlp``: a 3-layer perceptron on the arch's features (:func:`arch_features`),
  trained on the standardised log of the latency, so a 10 % error costs the same
  on a 2 ms model as on a 100 ms one (what MAPE measures) and every prediction is
  positive.
* ``flops-linear``: ``ms = a * GFLOPs + b * depth + c`` by least squares weighted
  by 1/ms (relative errors, as MAPE counts them). ``GFLOPs`` is
  ``space.flops(arch, seq_len) / 1e9`` (matmul work); ``depth`` is the number of
  op-layers that are not identities (``2 * layers`` in AutoTinyBERT's space),
  because at batch 1 the per-layer overhead (kernel launches, LayerNorm,
  softmax, Python dispatch) is a large share of a small model's time and does
  not scale with FLOPs.

The one with the lower held-out MAPE is kept (``kind``); both models'
held-out metrics are stored (``candidates``). Neither is refitted on the
held-out archs: the stored metrics describe exactly the model that predicts.
Pure torch, no Ray.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from raynas.atomic_io import atomic_dir
from raynas.errors import ConfigError
from raynas.search.metrics import kendall_tau, mape, rmse
from raynas.spaces import Space, space_from_dict
from raynas.spaces.ops import Identity

FORMAT, VERSION = "raynas-latency-predictor", 1
CONFIG_FILE, WEIGHTS_FILE = "predictor.json", "mlp.safetensors"
KINDS = ("mlp", "flops-linear")
LINEAR_FEATURES = ("gflops", "depth", "const")


def depth(space: Space, arch: Any) -> int:
    """Op-layers the arch runs that are not identities (both spaces: from ``space.plan``)."""
    return sum(not isinstance(op, Identity) for op in space.plan(arch)[1])


def arch_features(space: Space, arch: Any, seq_len: int) -> list[float]:
    """The MLP's input: ``space.encode(arch)`` plus log GFLOPs and depth.

    The encoding alone is what HAT uses; the two derived columns hand the MLP
    the quantities latency is close to linear in (work and layer count), so a
    few hundred archs are enough to learn the rest (cache effects, per-op overhead).
    """
    a = space.validate(arch)
    return [*space.encode(a), math.log(max(space.flops(a, seq_len), 1) / 1e9), float(depth(space, a))]


def split_holdout(archs: Sequence[str], fraction: float, seed: int,
                  always_train: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(train, holdout)``: a seeded ``fraction`` of ``archs`` held out, ``always_train`` never.

    The extremes (smallest, largest) stay in training so the held-out error is
    interpolation, as in search, and not extrapolation past the measured range.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout_fraction: expected in [0, 1), got {fraction}")
    keep = set(always_train)
    free = [a for a in archs if a not in keep]
    random.Random(seed).shuffle(free)
    n_out = min(len(free), round(fraction * len(archs)))
    held = set(free[:n_out])
    return [a for a in archs if a not in held], [a for a in archs if a in held]


# ---- the two models ------------------------------------------------------------------------
@dataclass
class LinearModel:
    """``ms = coef . (gflops, depth, 1)``."""

    coef: list[float]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> LinearModel:
        w = 1.0 / np.maximum(y, 1e-9)  # least squares on relative residuals (pred - y) / y
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        return cls([float(c) for c in coef])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ np.asarray(self.coef), 1e-6)  # a latency is never <= 0


def _mlp(n_in: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, 1))


@dataclass
class MLPModel:
    """Standardised features -> standardised log ms."""

    hidden: list[int]
    x_mean: list[float]
    x_std: list[float]
    y_mean: float
    y_std: float
    net: nn.Sequential

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, seed: int, hidden: Sequence[int] = (64, 64), steps: int = 300,
            lr: float = 3e-3, weight_decay: float = 1e-4) -> MLPModel:
        """Full-batch Adam with cosine decay: a few hundred rows, so one batch is the whole set (under a second).

        Short training on purpose: measured latencies are noisy, and on 240
        MiniLM-space archs 300 steps of a 64-wide net held out better than 800
        steps or 128/256-wide nets, which start fitting the noise.
        """
        x_mean, x_std = x.mean(0), x.std(0)
        x_std = np.where(x_std > 1e-12, x_std, 1.0)
        logy = np.log(y)
        y_mean, y_std = float(logy.mean()), float(logy.std()) or 1.0
        xt = torch.tensor((x - x_mean) / x_std, dtype=torch.float32)
        yt = torch.tensor((logy - y_mean) / y_std, dtype=torch.float32).unsqueeze(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _mlp(x.shape[1], hidden)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: on a busy machine, extra threads only wait for each other (10x slower)
        try:
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.mse_loss(net(xt), yt).backward()
                opt.step()
                sched.step()
        finally:
            torch.set_num_threads(threads)
        return cls(list(hidden), x_mean.tolist(), x_std.tolist(), y_mean, y_std, net.eval())

    def predict(self, x: np.ndarray) -> np.ndarray:
        xt = torch.tensor((x - np.asarray(self.x_mean)) / np.asarray(self.x_std), dtype=torch.float32)
        with torch.no_grad():
            z = self.net(xt).squeeze(1).double().numpy()
        return np.exp(z * self.y_std + self.y_mean)


def _scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    return {"mape": mape(pred, true), "rmse_ms": rmse(pred, true), "kendall_tau": float(kendall_tau(pred, true))}


# ---- the predictor -----------------------------------------------------------------------------
class LatencyPredictor:
    """Predicts milliseconds of one forward of an arch's base encoder under fixed settings.

    ``settings``: ``batch_size``, ``seq_len``, ``threads``, ``device``, ``warmup``,
    ``repeats`` of the measurements it was fitted on, and (from
    :func:`~raynas.search.latency_data.build_latency_predictor`) ``statistic``
    (median / min of the repeats) and ``normalized`` (each arch rescaled by
    the reference timed beside it, so ``reference_ms / prediction`` is the
    interleaved speedup). ``reference_ms``: the
    reference model's latency (teacher, or the space's largest arch) measured in
    the same run with the same protocol, so a budget like "4x" is
    ``reference_ms / 4``. ``metrics``: held-out ``mape`` (%), ``rmse_ms``,
    ``kendall_tau`` of the kept model, with ``noise_mape`` (re-measurement vs
    first measurement, %) and the set sizes; ``candidates``: the same per kind.
    """

    def __init__(self, space: Space, settings: dict[str, Any], kind: str, linear: LinearModel,
                 mlp: MLPModel | None, reference: str | None = None, reference_ms: float | None = None,
                 metrics: dict[str, Any] | None = None, candidates: dict[str, dict[str, Any]] | None = None) -> None:
        if kind not in KINDS or (kind == "mlp" and mlp is None):
            raise ValueError(f"kind {kind!r} is not a fitted model (have flops-linear{', mlp' if mlp else ''})")
        self.space, self.settings, self.kind = space, dict(settings), kind
        self.linear, self.mlp = linear, mlp
        self.reference, self.reference_ms = reference, reference_ms
        self.metrics = dict(metrics or {})
        self.candidates = dict(candidates or {})
        self.holdout_rows: list[dict[str, Any]] = []  # per held-out arch: measured and both predictions (fit only)

    @property
    def space_name(self) -> str:
        return self.space.name

    # ---- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, space: Space, archs: Sequence[Any], latency_ms: Sequence[float], settings: dict[str, Any], *,
            holdout_fraction: float = 0.2, seed: int = 0, reference: str | None = None,
            reference_ms: float | None = None, noise_mape: float | None = None,
            hidden: Sequence[int] = (64, 64), steps: int = 300) -> LatencyPredictor:
        """Fit both models on the training archs, score both on the held-out ones, keep the better.

        With ``holdout_fraction=0`` (or too few archs to hold any out) both
        are fitted on everything, metrics are nan and the MLP is kept.
        """
        names = [space.format(space.validate(a)) for a in archs]
        if len(set(names)) != len(names):
            raise ValueError("fit: an arch is listed twice")
        if len(names) != len(latency_ms) or len(names) < 4:
            raise ConfigError(f"latency predictor: need >= 4 measured archs with one latency each, got {len(names)}")
        y_of = dict(zip(names, (float(v) for v in latency_ms)))
        extremes = [space.format(space.smallest()), space.format(space.largest())]
        train, held = split_holdout(names, holdout_fraction, seed, extremes)
        seq_len = int(settings["seq_len"])

        def matrices(subset: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            feats = np.array([arch_features(space, a, seq_len) for a in subset], dtype=float)
            lin = np.array([[space.flops(a, seq_len) / 1e9, depth(space, a), 1.0] for a in subset], dtype=float)
            return feats, lin, np.array([y_of[a] for a in subset], dtype=float)

        f_tr, l_tr, y_tr = matrices(train)
        linear = LinearModel.fit(l_tr, y_tr)
        mlp = MLPModel.fit(f_tr, y_tr, seed, hidden, steps)
        candidates: dict[str, dict[str, Any]] = {}
        rows: list[dict[str, Any]] = []
        sizes = {"n_train": len(train), "n_holdout": len(held)}
        if len(held) >= 2:
            f_ho, l_ho, y_ho = matrices(held)
            preds = {"mlp": mlp.predict(f_ho), "flops-linear": linear.predict(l_ho)}
            candidates = {k: {**_scores(p, y_ho), **sizes} for k, p in preds.items()}
            kind = min(KINDS, key=lambda k: candidates[k]["mape"])
            rows = [{"arch": a, "measured_ms": float(t), **{f"{k}_ms": float(p[i]) for k, p in preds.items()}}
                    for i, (a, t) in enumerate(zip(held, y_ho))]
        else:
            nan = float("nan")
            candidates = {k: {"mape": nan, "rmse_ms": nan, "kendall_tau": nan, **sizes} for k in KINDS}
            kind = "mlp"
        metrics = {"kind": kind, **candidates[kind], "noise_mape": noise_mape}
        out = cls(space, settings, kind, linear, mlp, reference, reference_ms, metrics, candidates)
        out.holdout_rows = rows
        return out

    # ---- use ---------------------------------------------------------------------------------
    def predict(self, archs: Sequence[Any]) -> list[float]:
        """Milliseconds per arch (strings or parsed archs of this predictor's space; ConfigError otherwise)."""
        valid = [self.space.validate(a) for a in archs]
        if not valid:
            return []
        seq_len = int(self.settings["seq_len"])
        if self.kind == "mlp":
            assert self.mlp is not None
            x = np.array([arch_features(self.space, a, seq_len) for a in valid], dtype=float)
            return [float(v) for v in self.mlp.predict(x)]
        x = np.array([[self.space.flops(a, seq_len) / 1e9, depth(self.space, a), 1.0] for a in valid], dtype=float)
        return [float(v) for v in self.linear.predict(x)]

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """A folder with ``predictor.json`` (+ ``mlp.safetensors``), written atomically (replaces ``path``)."""
        meta: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "space_name": self.space.name,
            "space": self.space.to_dict(), "settings": self.settings, "reference": self.reference,
            "reference_ms": self.reference_ms, "metrics": self.metrics, "candidates": self.candidates,
            "linear": {"features": list(LINEAR_FEATURES), "coef": self.linear.coef},
            "mlp": None,
        }
        with atomic_dir(path, overwrite=True) as tmp:
            if self.mlp is not None:
                m = self.mlp
                meta["mlp"] = {"hidden": m.hidden, "x_mean": m.x_mean, "x_std": m.x_std, "y_mean": m.y_mean,
                               "y_std": m.y_std, "weights": WEIGHTS_FILE}
                save_file({k: v.detach().contiguous() for k, v in m.net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=_json_nan))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyPredictor:
        """The predictor saved at ``path``; ConfigError naming the file if it is missing or unreadable."""
        root = Path(path)
        meta_file = root / CONFIG_FILE
        if not meta_file.is_file():
            raise ConfigError(f"{root}: not a latency predictor folder (no {CONFIG_FILE})")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{meta_file}: unreadable ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConfigError(f"{meta_file}: not a {FORMAT} file")
        if meta.get("version") != VERSION:
            raise ConfigError(f"{meta_file}: format version {meta.get('version')!r}, this raynas reads {VERSION}")
        try:
            space = space_from_dict(meta["space"], where=f"{meta_file}: space")
            linear = LinearModel([float(c) for c in meta["linear"]["coef"]])
            mlp = None
            if meta.get("mlp"):
                m = meta["mlp"]
                net = _mlp(len(m["x_mean"]), m["hidden"])
                weights = root / m["weights"]
                try:
                    net.load_state_dict(load_file(str(weights)), strict=True)
                except (OSError, SafetensorError, RuntimeError) as exc:
                    raise ConfigError(f"{weights}: cannot read MLP weights ({str(exc).splitlines()[0]})") from None
                mlp = MLPModel(list(m["hidden"]), list(m["x_mean"]), list(m["x_std"]), float(m["y_mean"]),
                               float(m["y_std"]), net.eval())
            return cls(space, meta["settings"], meta["kind"], linear, mlp, meta.get("reference"),
                       meta.get("reference_ms"), meta.get("metrics"), meta.get("candidates"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{meta_file}: malformed ({type(exc).__name__}: {exc})") from None


def _json_nan(value: Any) -> Any:
    """json.dumps hook: numpy scalars as floats (nan stays nan, which json writes as NaN)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
