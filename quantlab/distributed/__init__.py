"""Calibration past one machine, on a Ray cluster (``pip install 'quantlab[ray]'``).

    quantlab convert MODEL -o out/w4 --recipe w4a16-g128-gptq --calib calib.txt --ray auto --shards 4

Shards (:mod:`quantlab.distributed.shard`, one Ray actor each) hold fixed, contiguous runs of the
calibration's canonical blocks (:mod:`quantlab.calib.blocks`) and those sequences' hidden states, which
never travel. Per decoder layer the driver (:mod:`quantlab.distributed.calibrate`) asks every shard for
its blocks' statistics (one idempotent call: advance through the previous, quantized layer, observe this
one), folds them in block order, lets the recipe's method decide, and publishes the layer's codes to
the object store for the next call. The artifact is the bytes one process writes; a probe
(:mod:`quantlab.distributed.probe`) refuses any node whose arithmetic differs from the driver's.
"""

from __future__ import annotations

from quantlab.errors import InputError

RAY_VERSION = "2.60.0"
INSTALL_HINT = f"pip install 'quantlab[ray]' (ray=={RAY_VERSION})"


def require_ray():
    """The ray module, or an InputError saying in one line how to install it."""
    try:
        import ray
    except ImportError as e:
        raise InputError(None, "--ray", f"needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray
