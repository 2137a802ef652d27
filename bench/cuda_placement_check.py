#!/usr/bin/env python3
"""Compare ``tqc.compiler.analysis.cuda_placement`` with ONNX Runtime's own placement of the same model.

    python bench/cuda_placement_check.py MODEL.onnx ORT_VERBOSE.log

The log is a CUDA session's verbose output (log_severity_level 0) on MODEL, as ``session_state.cc`` prints it
("Node(s) placed on [CPUExecutionProvider]. Number of nodes: N" and one "  Op (name)" line per node). Prints
the counts by op and the names only one side lists; exits 1 when the sets differ. On the GPU machine, without a
log: ``--run`` makes one (needs onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import onnx

from tqc.compiler.analysis.cuda_placement import host_placed_by_inference

HEADER = re.compile(r"Node\(s\) placed on \[CPUExecutionProvider\]\. Number of nodes: (\d+)")
NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\w+) \((.*)\)\s*$")


def logged_cpu_nodes(text: str) -> dict[str, str]:
    """name -> op of the nodes the log places on the CPU."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if HEADER.search(line)), None)
    if start is None:
        sys.exit("no 'Node(s) placed on [CPUExecutionProvider]' line in the log")
    count = int(HEADER.search(lines[start]).group(1))
    found = [NODE.search(line) for line in lines[start + 1:start + 1 + count]]
    return {m.group(2): m.group(1) for m in found if m}


def run_session(path: str) -> str:
    """A verbose CUDA session's log on ``path`` (stderr captured through a temporary file descriptor)."""
    import os
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 0
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            ort.InferenceSession(path, options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        finally:
            os.dup2(saved, 2)
        log.seek(0)
        return log.read().decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("log", nargs="?")
    parser.add_argument("--run", action="store_true", help="make the log with a CUDA session here")
    args = parser.parse_args()
    text = run_session(args.model) if args.run else open(args.log).read()
    logged = logged_cpu_nodes(text)
    model = onnx.load(args.model, load_external_data=False)
    mine = {n.name: n.op for n in host_placed_by_inference(model)}
    print(f"ORT: {len(logged)} on the CPU {dict(collections.Counter(logged.values()).most_common())}")
    print(f"tqc: {len(mine)} on the CPU {dict(collections.Counter(mine.values()).most_common())}")
    only_ort = sorted(set(logged) - set(mine))
    only_tqc = sorted(set(mine) - set(logged))
    for label, names, ops in (("only ORT", only_ort, logged), ("only tqc", only_tqc, mine)):
        for name in names:
            print(f"{label}: {ops[name]} {name}")
    sys.exit(1 if only_ort or only_tqc else 0)


if __name__ == "__main__":
    main()
