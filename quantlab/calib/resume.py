"""Per-layer checkpoints of a calibration, so a killed conversion resumes where it stopped.

A calibration of a large model runs for hours; losing it to a kill, an OOM or a reboot is costly.
After each layer, :func:`quantlab.calib.calibrate.calibrate` hands the layer's decisions (its
CalibrationResult entries and relative error) and the hidden states the next layer starts from to a
:class:`LayerCheckpoints`, which writes them into a folder beside the output::

    .{out}.resume/
        fingerprint.json     what the checkpoints were computed from (see calibration_fingerprint)
        layer-0000.npz       layer 0's entries: quantized weights, int8 codes, float overrides, error
        ...
        hidden-a.npy         (n, seq, hidden) float32 after a saved layer, in two slots used in turn
        hidden-b.npy
        hidden.json          which slot holds the latest hidden states, and after which layer

Every file is written to a temporary name, fsynced and renamed, so a kill leaves the previous state,
except the hidden-state slots: they are overwritten in place (a new 512 MB file per layer of a 1B model
cost ~3 s on the development VM, whose freed page cache goes back to the host; rewriting a cached file
~0.3 s), and only the slot hidden.json does not name is ever written, so the named one stays whole.
Arrays are stored with ``np.savez`` and read back with ``allow_pickle=False``: a planted checkpoint
folder can hold wrong numbers (the fingerprint guards against stale ones) but never run code.
``convert --resume`` restores the layers and continues from the next; because each layer's
computation is a deterministic function of its inputs, the artifact is the one an uninterrupted run
writes, byte for byte. A fingerprint that differs from the current inputs refuses to resume.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import quantlab
from quantlab.calib.experts import ExpertTokens
from quantlab.calib.layerwise import CalibrationResult
from quantlab.errors import InputError
from quantlab.quant.rtn import QuantizedWeight

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
FINGERPRINT_FILE = "fingerprint.json"
HIDDEN_FILE = "hidden.json"
HIDDEN_SLOTS = ("hidden-a.npy", "hidden-b.npy")


def resume_folder(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).absolute()
    return out.parent / f".{out.name}.resume"


def calibration_fingerprint(source_sha256: dict[str, str], recipe: dict, tokens: np.ndarray) -> dict:
    """Everything a calibration's result depends on, as a JSON-able dict with a digest of it."""
    tokens = np.ascontiguousarray(tokens)
    inputs = {
        "format_version": FORMAT_VERSION,
        "model": {Path(k).name: v for k, v in sorted(source_sha256.items())},
        "recipe": recipe,
        "calibration_data": {
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
            "shape": list(tokens.shape),
            "dtype": str(tokens.dtype),
        },
        "quantlab": quantlab.__version__,
        "numpy": np.__version__,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "inputs": inputs}


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A failed write through a file object (a full disk) carries no file name: give it the file's."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        with contextlib.suppress(OSError):
            path.unlink()
        raise OSError(e.errno, e.strerror, str(path)) from e


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _naming(tmp), open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _naming(tmp), open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _overwrite_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy into ``path`` in place (reusing a cached file's pages), then fsync."""
    with _naming(path), open(path, "r+b" if path.exists() else "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def _changed_inputs(saved: dict, current: dict) -> list[str]:
    saved_inputs = saved.get("inputs") if isinstance(saved, dict) else None
    if not isinstance(saved_inputs, dict):
        return ["everything (unreadable fingerprint)"]
    keys = sorted(set(saved_inputs) | set(current["inputs"]))
    return [k for k in keys if saved_inputs.get(k) != current["inputs"].get(k)] or ["(digest)"]


class LayerCheckpoints:
    """The checkpoint folder of one conversion: save after each layer, restore on resume."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict, *, resume: bool):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        fp_path = self.folder / FINGERPRINT_FILE
        if resume and fp_path.is_file():
            try:
                saved = json.loads(fp_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                saved = None
            if not isinstance(saved, dict) or saved.get("sha256") != fingerprint["sha256"]:
                changed = ", ".join(_changed_inputs(saved, fingerprint))
                raise InputError(
                    self.folder,
                    "fingerprint",
                    f"these checkpoints were computed from different inputs (changed: {changed}); "
                    "run without --resume to start over",
                )
        else:
            if self.folder.exists():
                logger.info("%s: discarding checkpoints of an earlier run (no --resume)", self.folder)
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            _atomic_write_text(fp_path, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")

    # -- saving -------------------------------------------------------------------------------------

    def save_layer(self, i: int, result: CalibrationResult, before: dict[str, set], hidden: np.ndarray | None) -> None:
        """Layer i's new entries in ``result`` (keys not in ``before``) and the hidden states after it
        (None: a distributed calibration, whose shards rebuild theirs by replaying the saved layers)."""
        arrays: dict[str, np.ndarray] = {"layer_error": np.float64(result.layer_errors[i])}
        for name in result.quantized:
            if name in before["quantized"]:
                continue
            qw = result.quantized[name]
            arrays[f"q/{name}/q"] = qw.q
            arrays[f"q/{name}/scales"] = qw.scales
            if qw.zero_points is not None:
                arrays[f"q/{name}/zero_points"] = qw.zero_points
            arrays[f"q/{name}/meta"] = np.array([qw.bits, qw.group_size], dtype=np.int64)
        for name, (codes, scales) in result.int8.items():
            if name not in before["int8"]:
                arrays[f"i8/{name}/codes"] = codes
                arrays[f"i8/{name}/scales"] = scales
        for name, value in result.float_overrides.items():
            if name not in before["float_overrides"]:
                arrays[f"f/{name}"] = value
        if i in result.experts:  # a sparse layer's token counts (quantlab.calib.experts.ExpertTokens)
            for field in ("routed", "calibrated", "rtn_fallback"):
                arrays[f"e/{field}"] = np.array(getattr(result.experts[i], field), dtype=np.int64)
        _atomic_savez(self.folder / f"layer-{i:04d}.npz", arrays)
        # The hidden states last: a kill between the files leaves a layer file nobody uses yet. They go
        # into the slot hidden.json does not name; only then does hidden.json name it.
        if hidden is None:
            _atomic_write_text(self.folder / HIDDEN_FILE, json.dumps({"slot": None, "layer": i}) + "\n")
            return
        current = self._hidden_state()
        slot = HIDDEN_SLOTS[1] if current is not None and current[0] == HIDDEN_SLOTS[0] else HIDDEN_SLOTS[0]
        _overwrite_npy(self.folder / slot, hidden)
        _atomic_write_text(self.folder / HIDDEN_FILE, json.dumps({"slot": slot, "layer": i}) + "\n")

    def _hidden_state(self) -> tuple[str | None, int] | None:
        """(slot file, layer) of the latest saved hidden states, or None before the first; the slot is
        None after a layer saved without its hidden states."""
        path = self.folder / HIDDEN_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            slot, layer = state["slot"], state["layer"]
        except (UnicodeDecodeError, ValueError, RecursionError, TypeError, KeyError) as e:
            raise InputError(path, None, f"unreadable checkpoint state ({e}); run without --resume") from e
        if (slot is not None and slot not in HIDDEN_SLOTS) or not isinstance(layer, int) or isinstance(layer, bool):
            raise InputError(path, "slot", f"not a checkpoint state: {state!r}; run without --resume")
        return slot, layer

    def offload_layer(self, i: int, result: CalibrationResult, before: dict[str, set]) -> None:
        """Point layer i's quantized entries in ``result`` at its saved file instead of memory."""
        for name in list(result.quantized):
            if name not in before["quantized"]:
                load = functools.partial(self.load_quantized, i, name)
                result.quantized.offload(name, result.quantized.shape(name), load)

    def load_quantized(self, i: int, name: str) -> QuantizedWeight:
        """One quantized linear of saved layer i."""
        path = self.folder / f"layer-{i:04d}.npz"
        prefix = f"q/{name}/"
        try:
            with np.load(path, allow_pickle=False) as z:
                bits, group_size = (int(v) for v in z[prefix + "meta"])
                zero_points = z[prefix + "zero_points"] if prefix + "zero_points" in z.files else None
                return QuantizedWeight(z[prefix + "q"], z[prefix + "scales"], zero_points, bits, group_size)
        except (OSError, KeyError, ValueError) as e:
            raise InputError(path, name, f"cannot read this layer checkpoint back ({e})") from e

    @staticmethod
    def keys_of(result: CalibrationResult) -> dict[str, set]:
        return {
            "quantized": set(result.quantized),
            "int8": set(result.int8),
            "float_overrides": set(result.float_overrides),
        }

    # -- restoring ----------------------------------------------------------------------------------

    def restore(
        self, num_layers: int, hidden_shape: tuple[int, ...] | None
    ) -> tuple[int, CalibrationResult, np.ndarray | None]:
        """(the first layer still to calibrate, the result so far, the hidden states to start from);
        ``hidden_shape`` None: the layers only (a distributed calibration replays them)."""
        result = CalibrationResult()
        state = self._hidden_state()
        if state is None:
            return 0, result, None
        slot, last = state
        hidden = None
        if hidden_shape is not None and slot is None:
            why = "saved by a distributed calibration (no hidden states): resume with --ray"
            raise InputError(self.folder / HIDDEN_FILE, "slot", why)
        if hidden_shape is not None:
            path = self.folder / slot
            try:
                hidden = np.array(np.load(path, allow_pickle=False), dtype=np.float32)
            except (OSError, ValueError) as e:
                raise InputError(path, "hidden", f"unreadable checkpoint ({e}); run without --resume") from e
            if hidden.shape != tuple(hidden_shape):
                why = f"checkpoint does not fit this calibration ({hidden.shape}, layer {last})"
                raise InputError(path, "hidden", why)
        if not 0 <= last < num_layers:
            why = f"checkpoint does not fit this calibration (layer {last})"
            raise InputError(self.folder / HIDDEN_FILE, "layer", why)
        for i in range(last + 1):
            self._restore_layer(i, result)
        logger.info("%s: resuming after layer %d of %d", self.folder, last, num_layers)
        return last + 1, result, hidden

    def _restore_layer(self, i: int, result: CalibrationResult) -> None:
        path = self.folder / f"layer-{i:04d}.npz"
        if not path.is_file():
            raise InputError(path, None, "checkpoint of this layer is missing; run without --resume")
        with np.load(path, allow_pickle=False) as z:
            entries = {k: z[k] for k in z.files}
        result.layer_errors.append(float(entries.pop("layer_error")))
        quantized: dict[str, dict] = {}
        int8: dict[str, dict] = {}
        experts = {}
        for key, value in entries.items():
            kind, _, rest = key.partition("/")
            if kind == "f":
                result.float_overrides[rest] = value
                continue
            if kind == "e":
                experts[rest] = tuple(int(n) for n in value)
                continue
            name, _, part = rest.rpartition("/")
            (quantized if kind == "q" else int8).setdefault(name, {})[part] = value
        for name, parts in quantized.items():  # read back when the emitter asks, as after save_layer
            result.quantized.offload(name, parts["q"].shape, functools.partial(self.load_quantized, i, name))
        for name, parts in int8.items():
            result.int8[name] = (parts["codes"], parts["scales"])
        if experts:
            result.experts[i] = ExpertTokens(**experts)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
