"""quantlab.quant: the quantization maths as pure functions on numpy arrays, no graph in sight.

scheme (parse ``w4a16-g128-asym``), rtn (codes, scales, zero points; the integer grid every method
shares), packing (MatMulNBits bytes), gptq, awq, smoothquant, metrics (SQNR, logit KL).
"""
