"""quantlab: a quantization and distillation compiler for LLMs that emits ONNX."""

__version__ = "0.1.0"
