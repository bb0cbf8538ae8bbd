"""Planning, in one place: will a model fit a device and how fast can it run, before running it.

* ``inference.py``: ``edgekd plan`` (per precision: weights, KV cache and activations against a
  device profile, and the decode roofline);
* ``training.py``: ``edgekd plan --train`` (every part of a distillation run's memory per
  process, its peak against the profile, and a step-time roofline);
* ``roofline.py``: bytes read per decoded token, prefill FLOPs, measured memory bandwidth and
  GEMM throughput (used by ``edgekd bench`` and the benchmarks too);
* ``memory.py``: measured peak memory of a training step, to check the training plan against.
"""

GB = 1e9  # the plans report decimal gigabytes, as device data sheets do
