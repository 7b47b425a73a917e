"""Checkpoint readers: validate, then stream tensors lazily.

Every reader returns a :class:`~quantlab.io.spec.Checkpoint`; :func:`load_checkpoint` picks the
reader from what the path is.
"""

from quantlab.io.spec import Checkpoint, ModelSpec, RopeScaling, TensorSource, TokenizerSpec

__all__ = ["Checkpoint", "ModelSpec", "RopeScaling", "TensorSource", "TokenizerSpec", "load_checkpoint"]


def load_checkpoint(path, *, allow_pickle: bool = False, tokenizer_path=None) -> Checkpoint:
    from quantlab.io.detect import load_checkpoint as _load

    return _load(path, allow_pickle=allow_pickle, tokenizer_path=tokenizer_path)
