"""The runtimes a benchmark can measure, as a table (``BACKENDS``): adding one is adding a row.

Each backend says which targets it runs (``accepts``), why it cannot run on this machine
(``why_unavailable``, None when it can) and opens a :class:`Session` inside the worker process.
A session does greedy decoding only and keeps its own KV cache:

    prefill(ids, chunk)  reset, run the prompt (``chunk`` tokens per forward), return the next id
    decode(token)        one step, return the next id
    mark() / rewind()    remember the cache length / go back to it (the context sweep decodes several
                         times from one long prefill)
    info()               facts for the JSON (providers, loader, weight bytes, cache type)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from quantlab.bench.targets import ARTIFACT, CHECKPOINT, Target

LLAMA_CPP_MISSING = (
    "llama-cpp-python is not installed: the registry has no prebuilt wheel for this platform (source only), "
    "building it takes ~12 min and is not done in CI"
)
# The torch runner with our kernels: a decoder with OrtDecoder's interface (forward, empty_cache).
TORCH_DECODER = ("quantlab.runtime.torch_decoder", "TorchDecoder")


class Session(Protocol):
    vocab_size: int

    def prefill(self, ids: Sequence[int], chunk: int) -> int: ...

    def decode(self, token: int) -> int: ...

    def mark(self) -> None: ...

    def rewind(self) -> None: ...

    def info(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    description: str
    accepts: Callable[[Target], bool]
    why_unavailable: Callable[[], str | None]
    open: Callable[..., Session]  # open(path, *, threads, max_tokens) -> Session, in the worker
    # optional: measured where present; where absent it is a note, not a row per target (unless asked for)
    optional: bool = False


# --- onnxruntime and anything with OrtDecoder's interface --------------------------------------------------


class DecoderSession:
    """A session over ``OrtDecoder`` (or any decoder with its ``forward``/``empty_cache``)."""

    def __init__(self, decoder, vocab_size: int, info: dict):
        self.decoder = decoder
        self.vocab_size = vocab_size
        self._info = info
        self.cache = decoder.empty_cache()
        self.marked = self.cache

    def prefill(self, ids: Sequence[int], chunk: int) -> int:
        self.cache = self.decoder.empty_cache()
        logits = None
        for start in range(0, len(ids), chunk):
            part = np.asarray([ids[start : start + chunk]], dtype=np.int64)  # (1, chunk)
            logits, self.cache = self.decoder.forward(part, self.cache)
        return int(np.argmax(logits[0, -1]))

    def decode(self, token: int) -> int:
        logits, self.cache = self.decoder.forward(np.asarray([[token]], dtype=np.int64), self.cache)
        return int(np.argmax(logits[0, -1]))

    def mark(self) -> None:
        self.marked = self.cache  # the forward returns new arrays: holding the old dict is enough

    def rewind(self) -> None:
        self.cache = self.marked

    def info(self) -> dict:
        return self._info


def _vocab(path: Path) -> int:
    from quantlab.eval.quality import model_config

    return int(model_config(path)["vocab_size"])


def _open_ort(path: Path, *, threads: int, max_tokens: int, providers: Sequence[str] = ("CPUExecutionProvider",)):
    from quantlab.runtime.generate import OrtDecoder

    decoder = OrtDecoder(path, threads=threads, providers=list(providers))
    cache_type = decoder.input_types[decoder.past_key_names[0]].__name__
    info = {"providers": decoder.session.get_providers(), "cache_dtype": cache_type, "intra_op_threads": threads}
    return DecoderSession(decoder, _vocab(path), info)


def _cuda_unavailable() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (a CPU build, or no GPU)"
    return None


def _open_ort_cuda(path: Path, *, threads: int, max_tokens: int):
    return _open_ort(
        path, threads=threads, max_tokens=max_tokens, providers=("CUDAExecutionProvider", "CPUExecutionProvider")
    )


def _torch_kernels_unavailable() -> str | None:
    try:
        importlib.import_module("quantlab.kernels.torch_ops")
    except Exception as e:  # any import failure (no torch, no built core) is a reason to report
        return f"quantlab.kernels.torch_ops does not import ({type(e).__name__}: {e})"
    module, name = TORCH_DECODER
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        return f"the kernels import, but there is no torch decoder yet ({module}.{name}: {type(e).__name__})"
    return None


def _open_torch_kernels(path: Path, *, threads: int, max_tokens: int):
    import torch

    torch.set_num_threads(threads)
    module, name = TORCH_DECODER
    decoder = getattr(importlib.import_module(module), name)(path, threads=threads)
    return DecoderSession(decoder, _vocab(path), {"torch": torch.__version__, "threads": threads})


# --- transformers, "what users run today" -------------------------------------------------------------------


class TransformersSession:
    def __init__(self, path: Path, dtype: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.model, loader = load_transformers_model(path, getattr(torch, dtype))
        self.vocab_size = int(self.model.config.vocab_size)
        self.cache = None
        self.marked = 0
        params = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        embed = self.model.get_input_embeddings().weight
        tied = self.model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
        # a tied head streams the embedding table once per step; an untied one leaves it gathered
        streamed = sum(params.values()) - (0 if tied else embed.numel() * embed.element_size())
        self._info = {
            "loader": loader,
            "dtype": dtype,
            "attn": "eager",
            "threads": threads,
            "torch": torch.__version__,
            "weight_bytes_per_step": int(streamed),
        }

    def _forward(self, ids: Sequence[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(
                input_ids=self.torch.tensor([list(ids)]), cache=self.cache, use_cache=True, logits_to_keep=1
            )
        self.cache = out.cache  # transformers 5 names it cache (past_key_values is deprecated)
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids: Sequence[int], chunk: int) -> int:
        self.cache = None
        for start in range(0, len(ids), chunk):
            next_id = self._forward(ids[start : start + chunk])
        return next_id

    def decode(self, token: int) -> int:
        return self._forward([token])

    def mark(self) -> None:
        self.marked = self.cache.get_seq_length()

    def rewind(self) -> None:
        extra = self.cache.get_seq_length() - self.marked
        if extra > 0:  # transformers 5 crops by a negative count: drop that many tokens from the end
            self.cache.crop(-extra)

    def info(self) -> dict:
        return self._info


def load_transformers_model(path: Path, dtype):
    """(model, how it was loaded): ``from_pretrained`` for an HF folder (and a GGUF when accelerate is
    there); otherwise quantlab's reader fills a ``LlamaForCausalLM`` of the same config, with llama2.c's
    adjacent-pair q/k rows turned into the half-split layout transformers rotates."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        return model.eval(), "transformers from_pretrained"
    if path.suffix == ".gguf" and importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="eager"
        )
        return model.eval(), "transformers from_pretrained(gguf_file)"
    from quantlab.io import load_checkpoint
    from quantlab.io.gguf_reader import unpermute_rows

    ckpt = load_checkpoint(path)
    cfg = {k: v for k, v in ckpt.hf_config.items() if k not in ("architectures", "torch_dtype")}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = ckpt.spec
    params = model.state_dict()  # a tied head shares the embedding's storage: filling one fills both
    loaded = set()
    for name in ckpt.tensors.names():  # one tensor at a time, so peak memory is the model plus one tensor
        w = ckpt.tensors.load(name)
        if spec.rope_interleaved and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_rows(w, spec.num_heads if ".q_proj." in name else spec.num_kv_heads)
        if name not in params:
            raise RuntimeError(f"{path}: tensor {name} has no place in {type(model).__name__}")
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(w))
        loaded.add(name)
    missing = set(params) - loaded - ({"lm_head.weight"} if spec.tie_word_embeddings else set())
    if missing:
        raise RuntimeError(f"{path}: no tensors for {sorted(missing)[:4]}")
    why = "accelerate is not installed" if path.suffix == ".gguf" else f"transformers reads no {ckpt.source_format}"
    return model.eval(), f"quantlab reader -> {type(model).__name__} ({why})"


def _transformers_unavailable() -> str | None:
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'quantlab[test]')"
    return None


def _open_transformers(dtype: str):
    def open_(path: Path, *, threads: int, max_tokens: int):
        return TransformersSession(path, dtype, threads)

    return open_


# --- llama.cpp ------------------------------------------------------------------------------------------------


class LlamaCppSession:
    def __init__(self, path: Path, threads: int, max_tokens: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=os.fspath(path),
            n_ctx=max_tokens,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            logits_all=False,
            verbose=False,
        )
        self.vocab_size = int(self.llm.n_vocab())
        self.marked = 0
        import llama_cpp

        self._info = {
            "llama_cpp": llama_cpp.__version__,
            "threads": threads,
            "weight_bytes_per_step": gguf_weight_bytes(path),
        }

    def _next(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefill(self, ids: Sequence[int], chunk: int) -> int:
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._next()

    def decode(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()

    def mark(self) -> None:
        self.marked = self.llm.n_tokens

    def rewind(self) -> None:
        self.llm.n_tokens = self.marked  # eval() drops the cache beyond n_tokens before it writes

    def info(self) -> dict:
        return self._info


def gguf_weight_bytes(path: Path) -> int:
    """Tensor bytes of a GGUF file a decode step streams: all but token_embd when the head is separate."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return sum(tensors.values()) - (tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0)


def _llama_cpp_unavailable() -> str | None:
    try:
        importlib.import_module("llama_cpp")
    except ModuleNotFoundError:
        return LLAMA_CPP_MISSING
    except Exception as e:  # installed but broken (a missing shared library, say)
        return f"llama_cpp does not import ({type(e).__name__}: {e})"
    return None


# --- the table ---------------------------------------------------------------------------------------------------


def _is_artifact(t: Target) -> bool:
    return t.kind == ARTIFACT


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend(
            "onnxruntime", "onnxruntime CPUExecutionProvider on the artifact", _is_artifact, lambda: None, _open_ort
        ),
        Backend(
            "onnxruntime-cuda",
            "onnxruntime CUDAExecutionProvider (KV cache on the host)",
            _is_artifact,
            _cuda_unavailable,
            _open_ort_cuda,
            optional=True,
        ),
        Backend(
            "torch-kernels",
            "torch with quantlab's matmul_nbits kernels, on quantized artifacts",
            lambda t: t.kind == ARTIFACT and t.quantized,
            _torch_kernels_unavailable,
            _open_torch_kernels,
        ),
        Backend(
            "transformers-fp32",
            "transformers eager attention, fp32 (what users run today)",
            lambda t: t.kind == CHECKPOINT,
            _transformers_unavailable,
            _open_transformers("float32"),
        ),
        Backend(
            "transformers-bf16",
            "transformers eager attention, bf16 (what users run today)",
            lambda t: t.kind == CHECKPOINT,
            _transformers_unavailable,
            _open_transformers("bfloat16"),
        ),
        Backend(
            "llama.cpp",
            "llama.cpp through llama-cpp-python, on the GGUF file as it is",
            lambda t: t.kind == CHECKPOINT and t.format == "gguf",
            _llama_cpp_unavailable,
            lambda path, *, threads, max_tokens: LlamaCppSession(path, threads, max_tokens),
        ),
    ]
}
