"""GPU smoke check of ``tqc serve --provider cuda`` (run by gpu_serve.sh before the benchmark).

For IO binding alone and with CUDA graphs: starts the server on MODEL, sends texts (one per request, and several
in one request) and raw tensors over gRPC, and compares the answers with the same ONNX model run directly by
ONNX Runtime's CUDA provider (tokenized by transformers, pooled and normalised in numpy). Prints one line per
mode; exit status 0 when CUDA graphs worked (the benchmark then uses them), 3 when only IO binding did.

    python bench/gpu_serve_check.py MODEL.onnx TOKENIZER_DIR [cpu]
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    model, tokenizer_dir = sys.argv[1], sys.argv[2]
    provider = sys.argv[3] if len(sys.argv) > 3 else "cuda"  # cpu: a dry run of this script's own code
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    from transformers import AutoTokenizer

    from tqc.compiler.tools.serve.repository import ServeOptions
    from tqc.compiler.tools.serve.server import TritonServer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    session = ort.InferenceSession(model, providers=["CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"])
    texts = ["A short one.", "Serving a transformer encoder behind Triton with the tokenizer inside the server, "
             "dynamic batching and CUDA graphs captured per bucket of batch and sequence sizes. " * 3,
             "Été à Zürich: naïve café"]

    def direct(text: str) -> np.ndarray:
        enc = tokenizer([text], truncation=True, max_length=256, return_tensors="np")
        feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
        hidden = session.run(None, feed)[0][0].astype(np.float32)
        pooled = hidden.mean(axis=0)
        return pooled / np.linalg.norm(pooled)

    expected = np.stack([direct(t) for t in texts])
    worked = {}
    for graph in (True, False):
        opts = ServeOptions(model=model, name="m", provider=provider, cuda_graph=graph, tokenizer=tokenizer_dir,
                            normalize=True, pooling="mean")
        try:
            server = TritonServer(opts, startup_timeout=300).start()
        except Exception as exc:  # reported, and the benchmark goes on without this mode
            print(f"check cuda_graph={graph}: server did not start: {exc}", flush=True)
            worked[graph] = False
            continue
        try:
            client = grpcclient.InferenceServerClient(server.grpc_url)

            def text_request(batch: list[str]) -> np.ndarray:
                encoded = [t.encode() for t in batch]
                data = np.zeros((len(encoded), max(map(len, encoded))), dtype=np.uint8)
                for row, e in enumerate(encoded):
                    data[row, :len(e)] = np.frombuffer(e, dtype=np.uint8)
                tensor = grpcclient.InferInput("TEXT", list(data.shape), "UINT8")
                tensor.set_data_from_numpy(data)
                return client.infer("m_text", [tensor]).as_numpy("embeddings")

            print("\n".join(line for line in server.log().splitlines() if "tqc-stub:" in line), flush=True)
            singles = np.concatenate([text_request([t]) for t in texts * 2])[:len(texts)]
            together = text_request(texts)
            enc = tokenizer(texts[1:2], return_tensors="np")
            inputs = []
            for meta in session.get_inputs():
                tensor = grpcclient.InferInput(meta.name, list(enc[meta.name].shape), "INT64")
                tensor.set_data_from_numpy(enc[meta.name].astype(np.int64))
                inputs.append(tensor)
            raw = client.infer("m", inputs).as_numpy(session.get_outputs()[0].name)
            raw_expected = session.run(None, {k: enc[k].astype(np.int64) for k in [m.name for m in session.get_inputs()]})[0]
            diffs = (float(np.abs(singles - expected).max()), float(np.abs(together - expected).max()),
                     float(np.abs(raw.astype(np.float32) - raw_expected.astype(np.float32)).max()))
            ok = max(diffs[:2]) < 5e-3 and diffs[2] < 5e-2
            print(f"check cuda_graph={graph}: text max|diff| one per request {diffs[0]:.2e}, three in one request "
                  f"{diffs[1]:.2e}; raw max|diff| {diffs[2]:.2e} -> {'ok' if ok else 'MISMATCH'}", flush=True)
            worked[graph] = ok
        finally:
            server.stop()
    return 0 if worked.get(True) else 3


if __name__ == "__main__":
    sys.exit(main())
