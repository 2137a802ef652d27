#!/usr/bin/env bash
# `tqc bench` on ORT CUDA (the GPU machine): bert-base FP32 export vs tqc fuse (FP32) vs tqc fuse+fp16,
# with IO binding, then with CUDA graphs; and the TensorRT entry points where TensorRT is absent.
# Run through bench/gpu_run.sh: bash bench/gpu_run.sh bash bench/gpu_cli_bench.sh
set -uo pipefail
W=/tmp/gb; mkdir -p "$W"; OUT=${OUT:-$W/out}; mkdir -p "$OUT"
cd "$W"  # not the repo root: there ./tqc (without its subpackages) would shadow the installed namespace
tqc() { python3 -m tqc "$@"; }
tqc -q export bert -o $W/bert.onnx
tqc -q compile $W/bert.onnx -p fold,fuse -o $W/bert_fused.onnx --target ort-cuda
tqc -q compile $W/bert.onnx -p fold,fuse,fp16 -o $W/bert_fused_fp16.onnx --target ort-cuda
S=1x16,1x128,8x128,32x128
tqc -q bench $W/bert.onnx $W/bert_fused.onnx $W/bert_fused_fp16.onnx --provider cuda --shapes $S --json $OUT/bench_cuda.json
tqc -q bench $W/bert_fused_fp16.onnx --provider cuda --cuda-graph --shapes $S --json $OUT/bench_cuda_graph.json
tqc -q bench $W/bert_fused_fp16.onnx --provider cuda --cuda-graph --lengths uniform --shapes $S --json $OUT/bench_cuda_graph_uniform.json
tqc -q check $W/bert_fused.onnx --target trt | head -3
tqc -q compile $W/bert.onnx -p fold,fuse -o $W/bert_trt.onnx --target trt
tqc -q check $W/bert_trt.onnx --target trt | head -3
echo "--- TensorRT entry points (TensorRT is not installable here):"
tqc -q build $W/bert_trt.onnx -o $W/bert.plan --shapes 1x16,8x128,32x512; echo "exit $?"
tqc -q bench $W/bert_trt.onnx --provider trt --shapes 1x16; echo "exit $?"
