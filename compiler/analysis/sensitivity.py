"""One sensitivity ranker for the sites of a quantized graph: the accuracy budget and ``tqc diff --sensitivity``.

The caller says what a site is (an id: ``tqc.passes.qdq.plan`` site ids) and how wrong the model is with a set
of sites returned to float (``error_with_float(ids)``; the empty set is the fully quantized model). The ranker
knows nothing about graphs::

    rank(ids, error_with_float)           one site at a time in float: error removed = baseline - error({id})
         -> Ranking(baseline, removed)    sites by the error each removes, largest first (ties keep ids' order)
    rank_groups(groups, error_with_float) one group (an op class: layer numbers as '*') at a time in float
    return_to_float(ranking, error_with_float, target)
                                          greedy: most useful site first, until error <= target

``qdq{budget=...}``: error = 1 - mean output cosine to the float graph on the calibration batches.
``tqc diff --sensitivity``: error = mean relative L2 of the outputs against the reference.
Every set is measured once (``Measured`` caches by set), so the greedy step reuses the one-site runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

ErrorWithFloat = Callable[[frozenset[str]], float]


class Measured:
    """``error_with_float`` evaluated at most once per set of ids."""

    def __init__(self, error_with_float: ErrorWithFloat):
        self.error_with_float = error_with_float
        self.cache: dict[frozenset[str], float] = {}

    def __call__(self, ids: Iterable[str]) -> float:
        key = frozenset(ids)
        if key not in self.cache:
            self.cache[key] = float(self.error_with_float(key))
        return self.cache[key]


def measured(error_with_float: ErrorWithFloat | Measured) -> Measured:
    """``error_with_float`` with its cache (kept when it has one already)."""
    return error_with_float if isinstance(error_with_float, Measured) else Measured(error_with_float)


@dataclass(frozen=True)
class Ranking:
    baseline: float                                          # error with every site quantized
    removed: dict[str, float] = field(default_factory=dict)  # site id -> error removed alone in float, largest first

    @property
    def order(self) -> list[str]:
        return list(self.removed)

    def share(self, value: float) -> float:
        return value / self.baseline if self.baseline else 0.0


def rank(ids: Sequence[str], error_with_float: ErrorWithFloat | Measured, baseline: float | None = None,
         progress: Callable[[str], None] = lambda message: None) -> Ranking:
    """Every site's error removed when it alone goes back to float, largest first."""
    measure = measured(error_with_float)
    base = measure(()) if baseline is None else baseline
    removed = {}
    for index, sid in enumerate(ids):
        progress(f"sensitivity {index + 1}/{len(ids)}: {sid}")
        removed[sid] = base - measure((sid,))
    ordered = sorted(removed.items(), key=lambda item: -item[1])  # stable: ties keep the order of ids
    return Ranking(base, dict(ordered))


def op_class(name: str) -> str:
    """'/model/encoder/layer.3/output/dense/MatMul' -> '/model/encoder/layer.*/output/dense/MatMul'."""
    return re.sub(r"\d+", "*", name)


def group_by(ids: Iterable[str], key: Callable[[str], str] = op_class) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for sid in ids:
        groups.setdefault(key(sid), []).append(sid)
    return groups


def rank_groups(groups: dict[str, list[str]], error_with_float: ErrorWithFloat | Measured,
                baseline: float) -> list[tuple[str, list[str], float]]:
    """(group, members, error removed with all members in float), largest first."""
    measure = measured(error_with_float)
    ranked = [(name, members, baseline - measure(members)) for name, members in groups.items()]
    return sorted(ranked, key=lambda item: -item[2])


def return_to_float(ranking: Ranking, error_with_float: ErrorWithFloat | Measured,
                    target: float) -> tuple[list[str], float]:
    """Sites returned to float, most useful first, until the error is at most ``target``: (kept, error)."""
    measure = measured(error_with_float)
    kept: list[str] = []
    error = ranking.baseline
    for sid in ranking.order:
        if error <= target:
            break
        kept.append(sid)
        error = measure(kept)
    return kept, error
