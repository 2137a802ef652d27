"""Checks of a calibration table (``tqc calibrate -o table.json``) before ``qdq`` uses it.

    table.json ─► JSON ─► schema and values ─► CalibrationTable ─► same model? ─► qdq
                          │ every key present, numbers finite,     │ the table's model_hash (sha256 of the
                          │ min <= max, amax >= 0, lo/hi paired     │ model file and its external data: weights
                          │ channel lists of equal length           │ included) against the model compiled
                          └ one line naming the tensor and key      └ a mismatch is refused (--allow-table-mismatch)

Without this a NaN range gives NaN scales and NaN weights (exit 0), a missing key an internal KeyError, and a
table computed on another model is used silently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tqc.compiler.core.errors import TqcError

_RANGE_DICTS = ("amax", "lo", "hi")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_table_data(data: dict, path: str | Path) -> None:
    """Raise one ``TqcError`` line for the first problem of a parsed table (``data``, the JSON object)."""
    where = f"calibration table '{path}'"
    for key in ("model_hash", "samples", "tensors"):
        if key not in data:
            raise TqcError(f"{where} lacks '{key}'")
    if not isinstance(data["model_hash"], str) or not data["model_hash"]:
        raise TqcError(f"{where}: 'model_hash' must be a non-empty string")
    samples = data["samples"]
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise TqcError(f"{where}: 'samples' must be a positive integer, got {samples!r}")
    if "seconds" in data and not _number(data["seconds"]):
        raise TqcError(f"{where}: 'seconds' must be a finite number, got {data['seconds']!r}")
    tensors = data["tensors"]
    if not isinstance(tensors, dict) or not tensors:
        raise TqcError(f"{where}: 'tensors' must be a non-empty object (tensor name -> ranges)")
    for name, entry in tensors.items():
        at = f"{where}, tensor '{name}'"
        if not isinstance(entry, dict):
            raise TqcError(f"{at}: expected an object of ranges, got {type(entry).__name__}")
        for key in ("min", "max", *_RANGE_DICTS):
            if key not in entry:
                raise TqcError(f"{at} lacks '{key}'")
        for key in ("min", "max"):
            if not _number(entry[key]):
                raise TqcError(f"{at}: '{key}' must be a finite number, got {entry[key]!r}")
        if entry["min"] > entry["max"]:
            raise TqcError(f"{at}: 'min' {entry['min']} is above 'max' {entry['max']}")
        for key in _RANGE_DICTS:
            ranges = entry[key]
            if not isinstance(ranges, dict):
                raise TqcError(f"{at}: '{key}' must be an object (method -> value)")
            for method, value in ranges.items():
                if not _number(value):
                    raise TqcError(f"{at}: '{key}' of '{method}' must be a finite number, got {value!r}")
                if key == "amax" and value < 0:
                    raise TqcError(f"{at}: 'amax' of '{method}' is negative ({value})")
        if set(entry["lo"]) != set(entry["hi"]):
            raise TqcError(f"{at}: 'lo' and 'hi' name different methods")
        for pair in (("channel_min", "channel_max"), ("real_channel_min", "real_channel_max")):
            _check_channels(at, pair, [entry.get(key) for key in pair])


def _check_channels(at: str, keys: tuple[str, str], channels: list) -> None:
    """A pair of per-channel range lists: both absent (null), or non-empty lists of finite numbers of one length."""
    if all(c is None for c in channels):
        return
    if not all(isinstance(c, list) for c in channels):
        raise TqcError(f"{at}: '{keys[0]}' and '{keys[1]}' must both be lists (or both null)")
    if len(channels[0]) != len(channels[1]) or not channels[0]:
        raise TqcError(f"{at}: '{keys[0]}' and '{keys[1]}' must be non-empty lists of equal length")
    for key, values in zip(keys, channels):
        if not all(_number(v) for v in values):
            raise TqcError(f"{at}: '{key}' holds a value that is not a finite number")


def check_table_matches(table, table_path: str | Path, model_path: str | Path, file_hash, skeleton,
                        allow_mismatch: bool = False, progress=lambda message: None) -> None:
    """Refuse a table computed on another model.

    ``file_hash``: the model's ``model_hash`` (a string, or a function returning it: the hash computed in a
    thread). Tables from ``tqc calibrate`` carry the file hash (weights included); older ones a structure
    hash (``graph-sha256:``), which is compared with the model's structure and said to miss the weights.
    """
    from tqc.compiler.io.model import structure_hash

    recorded = table.model_hash
    if recorded.startswith("graph-sha256:"):
        actual = structure_hash(skeleton)
        covers = "structure only: ops, names and weight shapes, not the weights' values"
    else:
        actual = file_hash() if callable(file_hash) else file_hash
        covers = "model file and its external data"
    if recorded == actual:
        if recorded.startswith("graph-sha256:"):
            progress(f"calibration table '{table_path}' identifies its model by structure only (not the weights): "
                     "recalibrate with 'tqc calibrate' for a table tied to the weights")
        return
    message = (f"calibration table '{table_path}' was computed on another model (its model_hash {recorded[:24]}..., "
               f"'{model_path}' has {actual[:24]}...; hash of the {covers})")
    if allow_mismatch:
        progress(message + ": used anyway (--allow-table-mismatch)")
        return
    raise TqcError(message + ": recalibrate with 'tqc calibrate', or pass --allow-table-mismatch to use it anyway")
