"""Graph passes over an ``onnx_ir.Model`` (installed as ``quantlab.passes``)."""
