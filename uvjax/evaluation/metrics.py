"""Scoring rules for Smart Watch evaluation: VQA matching, caption recall, Fréchet distance.

VQA answers are scored three ways per attribute (each level includes the previous one, so
``strict <= tolerant <= coarse``):

- **strict**: the normalised answer equals the normalised ground truth (lower case, outer whitespace
  and trailing ``.!,`` removed, inner whitespace collapsed). ``"Sunny."`` = ``sunny``; ``"it is sunny"``
  is not.
- **tolerant**: the value is *parsed* from the answer and compared with a tolerance: time ``H:MM``
  (first match; seconds ignored) within ±1 minute on the 12-hour dial (12:00 and 11:59 are 1 minute
  apart); battery: the first integer (``%`` optional) within ±5 points; weather and corners: exactly
  one of the allowed values occurs as a whole word in the answer and it is the right one.
- **coarse** (what a tiny model can learn, tiny-scale-calibration.md): time: same hour *and* same
  quarter hour (``m // 15``); battery: same 20-point bucket (0-19 ... 80-100); weather/corners: as
  tolerant. ``hour`` (time only) is reported beside it: the hour alone.

``reference`` reproduces the original repo's partial-credit score (seed-implementation.md §7.1):
time ``1 - (e_h/6 + e_m/30)/2`` with circular errors (``/3`` with seconds), battery
``1 - |Δ|/100``, others substring match; for comparison with published numbers only.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from uvjax.data import smartwatch as sw

_TIME = re.compile(r"(\d{1,2})\s*:\s*(\d{2})(?:\s*:\s*(\d{2}))?")
_INT = re.compile(r"(?<![\d:])(\d{1,3})(?![\d:])")
_CHOICES = {"weather": sw.WEATHERS, "weather_pos": sw.CORNERS, "battery_pos": sw.CORNERS}


def normalize(text: str) -> str:
    t = " ".join(str(text).lower().split())
    return t.strip().rstrip(".!,").strip()


def parse_time(text: str) -> tuple[int, int, int | None] | None:
    m = _TIME.search(text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), (int(m.group(3)) if m.group(3) else None)


def parse_battery(text: str) -> int | None:
    m = _INT.search(text)
    return int(m.group(1)) if m else None


def parse_choice(text: str, options: Iterable[str]) -> str | None:
    """The single allowed value present as a whole word (None when none or several are)."""
    t = normalize(text)
    found = [o for o in options if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", t)]
    return found[0] if len(found) == 1 else None


def _dial_minutes(h: int, m: int) -> int:
    return (h % 12) * 60 + m


def _circ(a: int, b: int, period: int) -> int:
    d = abs(a - b) % period
    return min(d, period - d)


def score_answer(attribute: str, prediction: str, truth: str) -> dict[str, float]:
    """Scores of one VQA answer: strict, tolerant, coarse, reference (+ hour for time)."""
    strict = float(normalize(prediction) == normalize(truth))
    out = {"strict": strict}
    if attribute == "time":
        gt, p = parse_time(truth), parse_time(prediction)
        if gt is None:
            raise ValueError(f"ground-truth time {truth!r} does not parse")
        if p is None:
            tol = hour = quarter = ref = 0.0
        else:
            tol = float(_circ(_dial_minutes(p[0], p[1]), _dial_minutes(gt[0], gt[1]), 720) <= 1)
            hour = float(p[0] % 12 == gt[0] % 12)
            quarter = float(hour and p[1] // 15 == gt[1] // 15)
            e = [_circ(p[0], gt[0], 12) / 6, _circ(p[1], gt[1], 60) / 30]
            if gt[2] is not None:
                e.append(_circ(p[2] or 0, gt[2], 60) / 30)
            ref = 1.0 - sum(e) / len(e)
        out.update(tolerant=max(strict, tol), hour=max(strict, hour))
        out["coarse"] = max(out["tolerant"], quarter)
        out["reference"] = ref
    elif attribute == "battery":
        gt, p = parse_battery(truth), parse_battery(prediction)
        if gt is None:
            raise ValueError(f"ground-truth battery {truth!r} does not parse")
        if p is None or p > 100:
            tol = bucket = ref = 0.0
        else:
            tol = float(abs(p - gt) <= 5)
            bucket = float(min(p // 20, 4) == min(gt // 20, 4))
            ref = 1.0 - abs(p - gt) / 100
        out["tolerant"] = max(strict, tol)
        out["coarse"] = max(out["tolerant"], bucket)
        out["reference"] = ref
    elif attribute in _CHOICES:
        tol = float(parse_choice(prediction, _CHOICES[attribute]) == normalize(truth))
        out["tolerant"] = out["coarse"] = max(strict, tol)
        out["reference"] = float(normalize(truth) in normalize(prediction))
    else:
        raise ValueError(f"unknown VQA attribute {attribute!r}; expected one of {sw.VQA_ATTRIBUTES}")
    return out


class Accumulator:
    """Means of per-item score dicts, grouped by a key, plus a micro-averaged ``all`` group."""

    def __init__(self):
        self.sums: dict[str, dict[str, float]] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, group: str, scores: dict[str, float]) -> None:
        for g in (group, "all"):
            s, c = self.sums.setdefault(g, {}), self.counts.setdefault(g, {})
            for k, v in scores.items():
                s[k] = s.get(k, 0.0) + float(v)
                c[k] = c.get(k, 0) + 1

    def result(self) -> dict[str, dict]:
        out = {}
        for g, s in self.sums.items():
            c = self.counts[g]
            out[g] = {"n": max(c.values()), **{k: s[k] / c[k] for k in s}}
        return out


def caption_scores(prediction: str, attrs: dict, mentioned: Iterable[str], time_seconds: bool = False) -> dict[str, float]:
    """Recall of the ground-truth caption's attributes in a generated caption: 1 when the attribute's
    value string occurs in the caption (case-insensitive; corners are whole words, so a caption that
    names the corner for the other element also counts: the metric is about values, not binding)."""
    t = normalize(prediction)
    out = {}
    for a in mentioned:
        v = sw.answer(a, attrs, time_seconds).lower()
        if a in _CHOICES:
            out[a] = float(re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", t) is not None)
        else:
            out[a] = float(v in t)
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]:
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)`` in float64 (no ``sqrtm``).

    When both sets are smaller than D (FID: a few hundred images of 2048-d features) the trace term is
    taken in the N x M sample space, exactly: with centred ``A = X_a / sqrt(N-1)``, ``B = X_b / sqrt(M-1)``
    the nonzero eigenvalues of ``S_a S_b = A^T A B^T B`` are the squared singular values of ``A B^T``, so
    the term is the nuclear norm of ``A B^T``. Otherwise from the eigenvalues of the symmetric
    ``S_a^1/2 S_b S_a^1/2`` (stable for rank-deficient covariances)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N>=2, D] of equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    mean_term = ((mu_a - mu_b) ** 2).sum()
    if max(len(a), len(b)) <= a.shape[1]:
        A = (a - mu_a) / np.sqrt(len(a) - 1)
        B = (b - mu_b) / np.sqrt(len(b) - 1)
        tr_cross = np.linalg.svd(A @ B.T, compute_uv=False).sum()
        return float(mean_term + (A * A).sum() + (B * B).sum() - 2 * tr_cross)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = root_a @ s_b @ root_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0, None)).sum()
    return float(mean_term + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)


__all__ = ["normalize", "parse_time", "parse_battery", "parse_choice", "score_answer", "Accumulator",
           "caption_scores", "frechet_distance"]
