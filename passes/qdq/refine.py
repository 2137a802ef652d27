"""The numbers behind ``qdq``'s refinements that keep every INT8 MatMul and the graph's structure: they change
constants only (a smoothing vector, INT8 weight values, a bias), never a node.

Each works on one linear layer y = x W + b (W as [K, N]) and a sample X [T, K] of its real input tokens on the
calibration data (``tqc.compiler.analysis.layer_inputs``):

  layer_error     ||fq(X / s) dq(q(diag(s) W)) - X W||^2: the error INT8 causes at the layer's output
  gptq_round      GPTQ (Frantar et al. 2022): round the rows of W one by one (per-output-channel scales fixed),
                  each row's rounding error fed back into the rows not rounded yet through the inverse Hessian
                  of the layer's input, H = X^T X (damped by ``damp`` x its mean diagonal); blocks of 128 rows
  bias_shift      fast bias correction (as NNCF's): the mean output error over the sample,
                  mean(fq(X / s)) dq(Wq) - mean(X) W, to subtract from the bias
"""

from __future__ import annotations

import numpy as np

from tqc.compiler.analysis.calibration import fake_quantize

ALPHAS = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.1))  # the auto-alpha grid (as Neural Compressor's)
ALPHA_TOKENS = 512  # tokens (evenly spaced over the sample) the alpha and cap grid is judged on (the cap alone:
# bert-base compiles in 1.16x the time without it, bench/results/compile_time_bert_cap_cpu.log)
GPTQ_BLOCK = 128


def per_channel_scale(weight: np.ndarray) -> np.ndarray:
    """The symmetric INT8 scale of every output channel of W [K, N] (max |w| / 127)."""
    amax = np.abs(weight).max(axis=0)
    return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)


def round_nearest(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)


def layer_error(x: np.ndarray, weight: np.ndarray, reference: np.ndarray, s: np.ndarray | None,
                activation: tuple[float, int, int, int], quantized: np.ndarray, centred: bool = False) -> float:
    """Squared error at the output: fq(X / s) @ ``quantized`` (the dequantized INT8 weight) against ``reference``
    (X @ W in float); ``centred``: less its mean over the tokens, the part bias correction takes out."""
    scaled = x if s is None else x / s.astype(np.float32)
    diff = fake_quantize(scaled, *activation) @ quantized - reference
    if centred:
        diff -= diff.mean(axis=0)
    return float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))


def gptq_round(weight: np.ndarray, scale: np.ndarray, x: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """INT8 codes of W [K, N] (scales per column fixed) that lower ||X W - X dq(Q)||^2 below round-to-nearest's."""
    w = np.asarray(weight, np.float32).copy()
    k = w.shape[0]
    x = np.asarray(x, np.float32)
    h = (x.T @ x).astype(np.float64)  # float32 products, float64 factorization
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0  # an input channel that is always zero: any rounding of its row is exact
    h[np.diag_indices(k)] += damp * float(np.mean(diag[~dead])) if (~dead).any() else damp
    try:
        upper = inverse_upper_cholesky(h).astype(np.float32)
    except np.linalg.LinAlgError:
        return round_nearest(weight, scale)
    scale = np.asarray(scale, np.float32)
    codes = np.empty(w.shape, np.int8)
    for start in range(0, k, GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, k)
        block = w[start:stop].copy()
        errors = np.empty_like(block)
        u = upper[start:stop, start:stop]
        for i in range(stop - start):
            q = np.clip(np.rint(block[i] / scale), -127, 127)
            codes[start + i] = q
            errors[i] = (block[i] - q * scale) / u[i, i]
            block[i + 1:] -= np.outer(u[i, i + 1:], errors[i])
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return codes


def inverse_upper_cholesky(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U (GPTQ's factor), without forming H^-1: with P the reversal,
    P H P = L L^T gives H^-1 = (P L^-1 P)^T (P L^-1 P), and P L^-1 P is upper triangular with a positive
    diagonal, so it is the factor. One Cholesky and one blocked triangular inverse (matrix products)."""
    lower = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    return np.ascontiguousarray(lower_inverse(lower)[::-1, ::-1])


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]."""
    n = lower.shape[0]
    if n <= 256:
        return np.linalg.inv(lower)
    m = n // 2
    top, bottom = lower_inverse(lower[:m, :m]), lower_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m] = top
    out[m:, m:] = bottom
    out[m:, :m] = -(bottom @ (lower[m:, :m] @ top))
    return out


def bias_shift(x: np.ndarray, weight: np.ndarray, s: np.ndarray | None, activation: tuple[float, int, int, int],
               quantized: np.ndarray) -> np.ndarray:
    """The mean output error of the INT8 layer over the sample (float64 [N]): subtract it from the bias."""
    scaled = x if s is None else x / s.astype(np.float32)
    mean_q = fake_quantize(scaled, *activation).astype(np.float64).mean(axis=0)
    return mean_q @ quantized.astype(np.float64) - x.astype(np.float64).mean(axis=0) @ weight.astype(np.float64)
