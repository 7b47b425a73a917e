"""W8A8 on CPUs with and without VNNI: SmoothQuant's KL to fp32 with three int8 weight quantizers, in one run.

onnxruntime's DynamicQuantizeMatMul multiplies uint8 activations by int8 weights; on x86 CPUs without VNNI
its kernel adds the products of input channels 2j and 2j + 1 in a saturating int16 (see
quantlab/quant/smoothquant.py). The three quantizers, each through the same calibration and graph:

- full-range int8 rows (max|w| / 127), what quantlab emitted before the pair bound;
- onnxruntime's own remedy, ``quantize_dynamic(reduce_range=True)``: 7-bit rows (max|w| / 63);
- quantlab's pair bound (max(max|w| / 127, max pair / 128)).

The model is the tests' tiny Llama with outlier channels (tests/tiny.py, seed 4); KL is measured on held-out
random tokens that calibration never saw. ``--emulate EPYC`` also runs the same measurement under
``qemu-x86_64 -cpu EPYC`` (apt's qemu-user: an AVX2 Zen without VNNI) and records both in one JSON.

    python benchmarks/bench_w8a8_cpus.py --emulate EPYC    # -> benchmarks/results/w8a8_cpus.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save  # noqa: E402


def measure() -> dict[str, float]:
    from quantlab.calib.calibrate import calibrate
    from quantlab.calib.layerwise import with_overrides
    from quantlab.graph_builder.decoder import build_decoder
    from quantlab.passes.quantize_dynamic import QuantizeDynamicInt8Pass
    from quantlab.quant import smoothquant
    from quantlab.quant.metrics import compare_logits
    from quantlab.recipe import load_recipe
    from tests.tiny import run_decoder, tiny_checkpoint

    ckpt = tiny_checkpoint(seed=4, hidden=64, ff=128, layers=2, heads=4, kv_heads=4)
    calib = np.random.default_rng(1).integers(3, 96, size=(24, 48))
    held_out = np.random.default_rng(2).integers(3, 96, size=(6, 48))
    tmp = Path(tempfile.mkdtemp())
    fp = run_decoder(build_decoder(ckpt), ckpt, tmp / "fp", held_out)

    def seven_bit(weight):
        weight = np.asarray(weight, np.float32)
        scales = np.abs(weight).max(axis=1) / np.float32(63)
        scales = np.where(scales > 0, scales, np.float32(1)).astype(np.float32)
        return np.clip(np.rint(weight / scales[:, None]), -63, 63).astype(np.int8), scales

    quantizers = {
        "full-range int8": smoothquant._quantize_rows_int8,
        "onnxruntime reduce_range (7-bit)": seven_bit,
        "quantlab pair bound": smoothquant.quantize_weight_per_channel_int8,
    }
    recipe = load_recipe("w8a8-smoothquant")
    kl = {}
    for n, (name, quantizer) in enumerate(quantizers.items()):
        original = smoothquant.quantize_weight_per_channel_int8
        smoothquant.quantize_weight_per_channel_int8 = quantizer  # what calibration's SmoothQuant calls
        try:
            result = calibrate(ckpt, recipe, calib, progress=False)
        finally:
            smoothquant.quantize_weight_per_channel_int8 = original
        model = build_decoder(with_overrides(ckpt, result.float_overrides))
        QuantizeDynamicInt8Pass(result.int8)(model)
        logits = run_decoder(model, ckpt, tmp / str(n), held_out)
        kl[name] = compare_logits(fp.reshape(-1, fp.shape[-1]), logits.reshape(-1, logits.shape[-1])).kl_mean
    return kl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulate", metavar="QEMU_CPU", help="also run under qemu-x86_64 -cpu QEMU_CPU (e.g. EPYC)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/w8a8_cpus.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return 0
    runs = [{"cpu": "this machine", "machine": machine(), "kl_to_fp32": measure()}]
    if args.emulate:
        cmd = ["qemu-x86_64", "-cpu", args.emulate, sys.executable, __file__, "--child"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        # /proc/cpuinfo under qemu-user is the host's: the emulated CPU is named, not read
        emulated = f"qemu-x86_64 -cpu {args.emulate} (emulated on this machine)"
        runs.append({"cpu": emulated, "kl_to_fp32": json.loads(out)})
    for run in runs:
        print(run["cpu"], {k: round(v, 5) for k, v in run["kl_to_fp32"].items()})
    save(args.json, {"benchmark": "w8a8_cpus", "command": " ".join(sys.argv), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
