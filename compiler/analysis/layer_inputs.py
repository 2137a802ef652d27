"""Token samples of linear-layer inputs on the calibration data, for ``qdq``'s refinements that need the data
itself, not only its ranges (SmoothQuant's alpha chosen per layer, GPTQ rounding, bias correction).

One pass over the data. Padding positions are left out (the feed's attention mask: they carry no meaning), and
the first real tokens of every tensor are kept, at most ``max_tokens`` of each and fewer when the samples of
all the tensors together would pass ``max_bytes`` (float32): memory is bounded by ``max_bytes``, not by the
number of calibration sentences.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from tqc.compiler.runtime.activations import stream_intermediates
from tqc.compiler.runtime.compare import padding_masks

MAX_TOKENS = 4096
MAX_BYTES = 512 << 20


def token_limit(widths: dict[str, int], max_tokens: int = MAX_TOKENS, max_bytes: int = MAX_BYTES) -> int:
    """Tokens kept per tensor: ``max_tokens``, or fewer so that every tensor's sample fits ``max_bytes``."""
    per_token = 4 * max(1, sum(widths.values()))
    return max(1, min(max_tokens, max_bytes // per_token))


def sample_inputs(model, feeds: Iterable, widths: dict[str, int], max_tokens: int = MAX_TOKENS,
                  max_bytes: int = MAX_BYTES, progress: Callable[[str], None] = lambda message: None
                  ) -> dict[str, np.ndarray]:
    """``widths``: tensor name -> its last axis (the layer's input features). Returns name -> float32 [T, K] of
    real (unpadded) tokens, T <= ``token_limit``; a tensor whose last axis is not its width is left out."""
    limit = token_limit(widths, max_tokens, max_bytes)
    progress(f"sampling the inputs of {len(widths)} linear layers on the calibration data (up to {limit} tokens "
             f"each, {limit * 4 * sum(widths.values()) / 2**20:.0f} MiB at most)")
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in widths}
    counts = dict.fromkeys(widths, 0)
    current: dict[str, np.ndarray | None] = {"mask": None}

    def tracked(source):
        for feed in source:
            masks = padding_masks([feed])
            current["mask"] = masks[0].astype(bool) if masks else None
            yield feed

    def observe(name: str, value: np.ndarray) -> None:
        width = widths.get(name)
        if width is None or counts[name] >= limit or value.ndim < 2 or value.shape[-1] != width:
            return
        mask = current["mask"]
        if mask is not None and value.shape[:-1] == mask.shape:
            rows = np.asarray(value, np.float32)[mask]
        elif mask is not None and value.ndim == 2 and value.shape[0] == mask.size:
            rows = np.asarray(value, np.float32)[mask.reshape(-1)]
        else:
            rows = np.asarray(value, np.float32).reshape(-1, width)
        rows = rows[: limit - counts[name]]
        chunks[name].append(np.array(rows, np.float32))
        counts[name] += rows.shape[0]

    stream_intermediates(model, tracked(feeds), observe, names=list(widths))
    return {name: np.concatenate(parts) for name, parts in chunks.items() if parts}
