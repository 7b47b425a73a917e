"""Quality evaluation: token data (:mod:`quantlab.eval.data`, shared with calibration) and perplexity,
KL divergence and top-1 agreement against a baseline artifact (:mod:`quantlab.eval.quality`)."""
