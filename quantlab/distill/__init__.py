"""Distillation: a student (fake-quantized or smaller) trained in PyTorch to match its teacher."""
