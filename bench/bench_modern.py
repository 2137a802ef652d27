#!/usr/bin/env python3
"""The modern encoders (#18) on the fusion benchmark: ModernBERT-base, DeBERTa-v3-base and MPNet-base shapes
(random weights), tqc ``fold,fuse(+fp16)`` against ONNX Runtime's transformers optimizer on the same export,
torch eager and torch.compile (reduce-overhead, FP16; GPU only), at 1x128 and 32x128.

    python bench/bench_modern.py --device cuda --json bench/results/modern_cuda.json   (GPU machine)
    python bench/bench_modern.py --device cpu  --json bench/results/modern_cpu.json

Every option of ``bench_fuse.py`` applies; this script only sets the families and shapes. Each family is
exported with every attention implementation transformers has for it (ModernBERT: sdpa and eager; DeBERTa-v3
and MPNet: eager only), and the table says how many attention blocks each tool fused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fuse  # noqa: E402

DEFAULTS = ["--models", "modernbert,deberta-v3,mpnet", "--shapes", "1x128,32x128"]

if __name__ == "__main__":
    given = sys.argv[1:]
    extra = [arg for i, arg in enumerate(DEFAULTS) if i % 2 == 0 and arg not in given for arg in DEFAULTS[i:i + 2]]
    sys.argv = [sys.argv[0], *extra, *given]
    bench_fuse.main()
