"""Token samples of linear-layer inputs on the calibration data, for ``qdq``'s refinements that need the data
itself, not only its ranges (SmoothQuant's alpha chosen per layer, GPTQ rounding, bias correction).

Padding positions are left out (the feed's attention mask: they carry no meaning), and the first real tokens of
every tensor are kept, at most ``max_tokens`` of each and fewer when the samples of all the tensors together
would pass ``max_bytes`` (float32): memory is bounded by ``max_bytes``, not by the number of calibration
sentences. A ``Sampler`` rides along the calibration's first pass over the data (``calibrate(sampler=...)``), so
sampling costs no pass of its own; ``sample_inputs`` makes that pass when the ranges came from a table.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from tqc.compiler.runtime.activations import stream_intermediates
from tqc.compiler.runtime.compare import padding_masks

MAX_TOKENS = 4096
MAX_BYTES = 256 << 20  # MiniLM keeps 4,096 tokens; bert-base ~1,000 (what bias correction and GPTQ see)


def token_limit(widths: dict[str, int], max_tokens: int = MAX_TOKENS, max_bytes: int = MAX_BYTES) -> int:
    """Tokens kept per tensor: ``max_tokens``, or fewer so that every tensor's sample fits ``max_bytes``."""
    per_token = 4 * max(1, sum(widths.values()))
    return max(1, min(max_tokens, max_bytes // per_token))


def token_rows(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """``value``'s rows of the real tokens, [T, K], where ``mask`` (the feed's [batch, seq] attention mask, bool)
    lines up with its leading axes ([batch, seq, K], or [batch * seq, K]); None where it does not (no mask, or a
    tensor of another layout)."""
    if mask is not None and value.shape[:-1] == mask.shape:
        return value[mask]
    if mask is not None and value.ndim == 2 and value.shape[0] == mask.size:
        return value[mask.reshape(-1)]
    return None


def feed_mask(feed) -> np.ndarray | None:
    """The feed's attention mask as bool [batch, seq], or None where the model takes none."""
    masks = padding_masks([feed])
    return masks[0].astype(bool) if masks else None


class Sampler:
    """Collects the samples: ``track`` wraps the feeds (it follows each feed's mask), ``observe`` takes the
    tensors a stream over those feeds yields, ``samples`` returns name -> float32 [T, K]."""

    def __init__(self, widths: dict[str, int], max_tokens: int = MAX_TOKENS, max_bytes: int = MAX_BYTES):
        self.widths = dict(widths)  # tensor name -> its last axis (the layer's input features)
        self.limit = token_limit(self.widths, max_tokens, max_bytes)
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.widths}
        self.counts = dict.fromkeys(self.widths, 0)
        self.mask: np.ndarray | None = None

    def describe(self) -> str:
        return (f"sampling the inputs of the linear layers ({len(self.widths)} tensors, up to {self.limit} tokens "
                f"each, {self.limit * 4 * sum(self.widths.values()) / 2**20:.0f} MiB at most)")

    def track(self, feeds: Iterable) -> Iterable:
        for feed in feeds:
            self.mask = feed_mask(feed)
            yield feed

    def observe(self, name: str, value: np.ndarray) -> None:
        width = self.widths.get(name)
        if width is None or self.counts[name] >= self.limit or value.ndim < 2 or value.shape[-1] != width:
            return
        value = np.asarray(value, np.float32)
        rows = token_rows(value, self.mask)
        rows = value.reshape(-1, width) if rows is None else rows
        rows = rows[: self.limit - self.counts[name]]
        self.chunks[name].append(np.array(rows, np.float32))
        self.counts[name] += rows.shape[0]

    def samples(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.chunks.items() if parts}


def sample_inputs(model, feeds: Iterable, widths: dict[str, int], max_tokens: int = MAX_TOKENS,
                  max_bytes: int = MAX_BYTES, progress: Callable[[str], None] = lambda message: None
                  ) -> dict[str, np.ndarray]:
    """One pass of its own over ``feeds``: name -> float32 [T, K] of real (unpadded) tokens, T <= ``token_limit``;
    a tensor whose last axis is not its width is left out."""
    sampler = Sampler(widths, max_tokens, max_bytes)
    progress(sampler.describe())
    stream_intermediates(model, sampler.track(feeds), sampler.observe, names=list(widths))
    return sampler.samples()
