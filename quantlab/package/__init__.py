"""Edge and mobile bundles: a verified, self-contained folder (or zip) built from an artifact.

``build_bundle`` (:mod:`quantlab.package.bundle`) copies an artifact's model, tokenizer and configs
for a target, adds ``run_bundle.py`` (greedy generation with only onnxruntime, numpy and tokenizers)
and a manifest with every file's hash; ``verify_bundle`` (:mod:`quantlab.package.verify`) checks it.
"""
