"""Opt-in speed rewrites, imported only when a `perf.*` setting asks for one (train/perf.py
decides): the default run trains train/model.py exactly as written. Each stays while a
benchmark in docs/performance.md shows it pays where it is meant to run.

- cpu_layers: faster CPU forms of two layers (perf.cpu_layers)
- thin_conv: the 1-channel convs as zero-padded 8-channel ones for cuDNN (perf.pad_thin_convs)
- cuda_graph: each optimizer step replayed as one CUDA graph (perf.cuda_graphs)
- host_memory: glibc's malloc keeps freed host memory for the next step (perf.reuse_host_memory)
"""
