"""edgekd: distil vision-language models, export them for the edge, and benchmark them there.

Stages (each a subpackage):
  * ``edgekd.distill``  Switch-KD distillation of a LLaVA-style teacher into a small student.
  * ``edgekd.export``   ONNX, TensorRT and GGUF artifacts that prove parity with PyTorch.
  * ``edgekd.runtime``  one generate API over every artifact, and the benchmarks.
Shared layers: ``edgekd.models`` (the VLM adapter and tiny models), ``edgekd.data``
(LLaVA-format data), ``edgekd.profiles`` (device and recipe profiles).
"""

__version__ = "0.1.0"
