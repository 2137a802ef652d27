"""Layer 7, tools built on the pipeline: compile, diff, bench, inspect (summary), TensorRT check and build,
Triton export, serve."""
