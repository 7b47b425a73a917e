"""torch.ops.quantlab.matmul_nbits: registration, fake implementation, numerics on CPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernels.helpers import make_case

torch = pytest.importorskip("torch")
import quantlab.kernels.torch_ops  # noqa: E402,F401  (registers the op)
from quantlab import kernels  # noqa: E402


def _case():
    rng = np.random.default_rng(11)
    x, b, s, z = make_case(rng, m=3, k=256, n=10, bits=4, block_size=32, zp=True)
    return torch.from_numpy(x), torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(z)


def test_op_matches_python_entry():
    x, b, s, z = _case()
    y = torch.ops.quantlab.matmul_nbits(x, b, s, z, K=256, N=10, block_size=32)
    ref = kernels.matmul_nbits(x.numpy(), b.numpy(), s.numpy(), z.numpy(), K=256, N=10, block_size=32)
    assert y.shape == (3, 10) and np.array_equal(y.numpy(), ref)


def test_opcheck_fake_and_schema():
    x, b, s, z = _case()
    torch.library.opcheck(
        torch.ops.quantlab.matmul_nbits.default,
        (x, b, s, z),
        {"K": 256, "N": 10, "block_size": 32},
        test_utils=("test_schema", "test_faketensor"),
    )


def test_meta_shape():
    x, b, s, z = _case()
    y = torch.ops.quantlab.matmul_nbits(
        x.to("meta").reshape(1, 3, 256), b.to("meta"), s.to("meta"), z.to("meta"), K=256, N=10, block_size=32
    )
    assert y.shape == (1, 3, 10) and y.device.type == "meta"
