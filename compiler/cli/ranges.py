"""Ranges of the numeric command-line options, declared where the options are declared.

    @click.option("--batch-size", type=COUNT)             0 -> "tqc: error: Invalid value for '--batch-size':
                                                               0 is not in the range x>=1."
    @click.option("--budget", type=finite_float(min=0, min_open=True))    nan, inf, -1 refused the same way

``click.FloatRange`` lets NaN through (every comparison with NaN is false); ``FiniteFloatRange`` does not.
"""

from __future__ import annotations

import math

import click

from tqc.models.recipes import OPSETS, SEEDS

COUNT = click.IntRange(min=1)             # samples, batch sizes, runs, lengths: at least one
NON_NEGATIVE = click.IntRange(min=0)      # warm-up runs, delays
SEED = click.IntRange(min=SEEDS[0], max=SEEDS[1])  # numpy's and torch's seed range
OPSET = click.IntRange(min=min(lo for lo, _ in OPSETS.values()), max=max(hi for _, hi in OPSETS.values()))


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number (allowed: {self._describe_range()})", param, ctx)
        return super().convert(number, param, ctx)


def finite_float(min: float | None = None, max: float | None = None, min_open: bool = False,
                 max_open: bool = False) -> FiniteFloatRange:
    return FiniteFloatRange(min=min, max=max, min_open=min_open, max_open=max_open)
