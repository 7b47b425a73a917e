"""PyTorch pickled state dicts (``pytorch_model.bin``, ``*.pt``) in Hugging Face naming.

Pickles can run code when loaded, so this reader only runs when the user passed ``--allow-pickle``,
and even then only through ``torch.load(weights_only=True, mmap=True)``: the restricted unpickler
accepts tensors and plain containers, and the memory map keeps the weights on disk until a tensor is
loaded. torch is imported inside the functions, never when ``quantlab.io`` is imported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.io.common import check_finite, inside_folder, read_json_file, with_tokenizer_ids
from quantlab.io.hf import read_config, select_tensors, spec_from_hf_config
from quantlab.io.hf_tokenizer import hf_tokenizer_spec
from quantlab.io.spec import Checkpoint

logger = logging.getLogger(__name__)

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.bin", "consolidated.pt")
INDEX_NAME = "pytorch_model.bin.index.json"


def pickle_refused(path) -> InputError:
    return InputError(
        path,
        None,
        "is a PyTorch pickle, which can run arbitrary code when loaded; pass --allow-pickle if you trust it "
        "(it is then read with torch.load(weights_only=True)), or convert it to safetensors",
    )


def _load_state_dict(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or ValueError for bad files
        raise InputError(path, None, f"cannot be read by torch.load(weights_only=True, mmap=True): {e}") from None
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"model": {...}} or {"state_dict": {...}}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, None, "does not hold a flat state dict of tensors")
    return state


def _pickle_files(folder: Path, path: Path) -> tuple[Path, list[Path]]:
    """(the file to blame for missing tensors, the pickles to read)."""
    if path.is_file():
        return path, [path]
    index = folder / INDEX_NAME
    if index.is_file():
        raw = read_json_file(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(index, "weight_map", "must be a non-empty object of tensor name -> shard file")
        shards = dict.fromkeys(inside_folder(folder, name, index, "weight_map") for name in weight_map.values())
        return index, list(shards)
    for name in PICKLE_NAMES:
        if (folder / name).is_file():
            return folder / name, [folder / name]
    raise InputError(folder, "pytorch_model.bin", "no PyTorch weights found")


class TorchStateDictSource:
    """TensorSource over memory-mapped torch tensors."""

    def __init__(self, tensors: dict, files: dict | None = None):
        self._tensors = tensors
        self._files = files or {}  # name -> the pickle it came from, for error messages

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def load(self, name: str) -> np.ndarray:
        import torch

        tensor = self._tensors[name].detach()
        if tensor.dtype == torch.float32:
            out = tensor.contiguous().numpy().copy()  # the mmapped storage must not escape
        else:
            out = tensor.to(torch.float32).contiguous().numpy()
        return check_finite(out, self._files.get(name), name)


def load_torch_pickle(path: str | os.PathLike, *, allow_pickle: bool, tokenizer_path=None) -> Checkpoint:
    """``path`` is a folder with config.json + pickles, or a pickle file beside a config.json."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not allow_pickle:
        raise pickle_refused(path)
    config_path, config = read_config(folder)
    spec = spec_from_hf_config(config, config_path)
    weights_path, files = _pickle_files(folder, path)
    state: dict = {}
    for file in files:
        for name, tensor in _load_state_dict(file).items():
            if name in state:
                raise InputError(file, name, "tensor stored in two shards")
            state[name] = (tensor, file)
    shapes = {name: tuple(t.shape) for name, (t, _) in state.items()}
    select_tensors(spec, shapes, config_path=config_path, weights_path=weights_path)
    names = list(spec.expected_shapes())
    for name in names:
        tensor, file = state[name]
        if not tensor.is_floating_point():
            raise InputError(file, name, f"dtype {tensor.dtype} is not a float type")
    tokenizer = hf_tokenizer_spec(folder, spec, tokenizer_path=tokenizer_path)
    if tokenizer is not None:
        spec = with_tokenizer_ids(spec, tokenizer)
    return Checkpoint(
        spec=spec,
        tensors=TorchStateDictSource({n: state[n][0] for n in names}, {n: state[n][1] for n in names}),
        tokenizer=tokenizer,
        source_format="torch-pickle",
        source_files=(str(config_path), *(str(f) for f in files)),
        hf_config=config,
    )
