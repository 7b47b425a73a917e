"""The runtimes a benchmark can measure, as a table (``BACKENDS``): adding one is adding a row.

Each backend says which targets it runs (``accepts``), why it cannot run on this machine
(``why_unavailable``, None when it can) and opens a :class:`Session` inside the worker process.
A session does greedy decoding only and keeps its own KV cache:

    prefill(ids, chunk)  reset, run the prompt (``chunk`` tokens per forward), return the next id
    decode(token)        one step, return the next id
    mark() / rewind()    remember the cache length / go back to it (the context sweep decodes several
                         times from one long prefill)
    info()               facts for the JSON (providers, loader, weight bytes, cache type)

A backend marked ``speculates`` opens :class:`DecoderSession` s, whose ``decoder`` the speculative rows
(``--draft``, :mod:`quantlab.bench.speculative`) drive directly.

A backend marked ``batched`` opens sessions that also run B sequences through one cache (``--batch``):

    prefill_batch(prompts, chunk)  reset, run the prompts (left-padded), return each one's next id
    decode_batch(tokens)           one step for every sequence, return their next ids
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from quantlab.bench.peers import llama_cpp_extra_buffers
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
    batched: bool = False  # its sessions have prefill_batch / decode_batch (see the module docstring)
    rewinds: bool = True  # its sessions mark/rewind; else a context sweep prefills again for every run
    speculates: bool = False  # its sessions are DecoderSessions: ``.decoder`` runs speculative decoding (--draft)


# --- onnxruntime and anything with OrtDecoder's interface --------------------------------------------------


class DecoderSession:
    """A session over ``OrtDecoder`` (or any decoder with its ``forward``/``empty_cache``)."""

    def __init__(self, decoder, vocab_size: int, info: dict):
        self.decoder = decoder
        self.vocab_size = vocab_size
        self._info = info
        self.cache = decoder.empty_cache()
        # batched: the attention mask (batch, total) and each sequence's last position (batch, 1)
        self.mask = self.positions = None
        self.marked = (self.cache, None, None)

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

    def prefill_batch(self, prompts: Sequence[Sequence[int]], chunk: int) -> list[int]:
        from quantlab.runtime.generate import left_pad

        ids, mask, positions = left_pad(prompts)  # (batch, longest) each
        self.cache = self.decoder.empty_cache(len(prompts))
        for start in range(0, ids.shape[1], chunk):
            end = start + chunk
            logits, self.cache = self.decoder.forward(
                ids[:, start:end], self.cache, attention_mask=mask[:, :end], position_ids=positions[:, start:end]
            )
        self.mask, self.positions = mask, positions[:, -1:]
        return np.argmax(logits[:, -1], axis=-1).tolist()

    def decode_batch(self, tokens: Sequence[int]) -> list[int]:
        self.positions = self.positions + 1
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        step = np.asarray(tokens, dtype=np.int64)[:, None]  # (batch, 1)
        logits, self.cache = self.decoder.forward(
            step, self.cache, attention_mask=self.mask, position_ids=self.positions
        )
        return np.argmax(logits[:, -1], axis=-1).tolist()

    def mark(self) -> None:
        # the forward returns new arrays: holding the old dict (and mask, positions) is enough
        self.marked = (self.cache, self.mask, self.positions)

    def rewind(self) -> None:
        self.cache, self.mask, self.positions = self.marked

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


# --- onnxruntime-genai ---------------------------------------------------------------------------------------


class GenaiSession:
    """onnxruntime-genai's own generation loop (greedy search) on any folder with a genai_config.json:
    the model builder's output, or a quantlab artifact. genai keeps the KV cache and the positions.

    ``generate_next_token`` runs the model on the token it picked last time (none after
    ``append_tokens``, which runs the prompt) and then picks the next one: so the prefill is
    append_tokens + a pick, and each decode step is one forward + a pick, as in the other sessions.
    """

    def __init__(self, path: Path, threads: int, max_tokens: int):
        import json

        import onnxruntime_genai as og

        self.og = og
        config = og.Config(os.fspath(path))
        config.clear_providers()  # the CPU; the builder's config may name another provider
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.max_length = max_tokens
        self.vocab_size = _vocab(path)
        self.pad_id = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))["model"].get("pad_token_id")
        self.generator = None
        self._info = {"onnxruntime_genai": og.__version__, "intra_op_threads": threads, "search": "greedy"}

    def _start(self, prompts: Sequence[Sequence[int]]):
        if any(self.pad_id in p for p in prompts):  # genai would mask it out as padding: another prompt
            raise ValueError(f"the prompt holds the pad id {self.pad_id}, which onnxruntime-genai masks out")
        batch = len(prompts)
        params = self.og.GeneratorParams(self.model)
        # genai stops for good at end-of-sequence (later steps do nothing, fast); min_length = max_length
        # masks it out instead, so every step runs: the one way this loop differs from the other sessions'
        params.set_search_options(
            max_length=self.max_length, min_length=self.max_length, do_sample=False, batch_size=batch
        )
        self.generator = self.og.Generator(self.model, params)

    def prefill(self, ids: Sequence[int], chunk: int) -> int:
        self._start([ids])
        self.generator.append_tokens(np.asarray(ids, dtype=np.int32))  # genai runs the prompt in one forward
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def decode(self, token: int) -> int:  # noqa: ARG002 (genai feeds the token it picked: the same, greedy)
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def prefill_batch(self, prompts: Sequence[Sequence[int]], chunk: int) -> list[int]:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the onnxruntime-genai session batches prompts of one length only (no padding)")
        self._start(prompts)
        self.generator.append_tokens(np.asarray(prompts, dtype=np.int32))  # (batch, prompt_len)
        self.generator.generate_next_token()
        return [int(t) for t in self.generator.get_next_tokens()]

    def decode_batch(self, tokens: Sequence[int]) -> list[int]:  # noqa: ARG002 (genai feeds its own picks)
        self.generator.generate_next_token()
        return [int(t) for t in self.generator.get_next_tokens()]

    # No mark/rewind (Backend.rewinds=False): after genai's rewind_to(n) the next generate_next_token
    # runs two forwards (token n-1 again, then the one it picks), so a timed step would be two steps.
    def mark(self) -> None:
        raise NotImplementedError("onnxruntime-genai sessions prefill again for every run")

    rewind = mark

    def info(self) -> dict:
        return self._info


def _genai_unavailable() -> str | None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    return None


def _has_genai_config(t: Target) -> bool:
    """An artifact with a genai_config.json that does not say onnxruntime-genai cannot run it (a per-token int8
    cache: quantlab.emit.artifact writes why under model.decoder.kv_cache.onnxruntime_genai)."""
    config = t.path / "genai_config.json"
    if t.kind != ARTIFACT or not config.is_file():
        return False
    try:
        decoder = json.loads(config.read_text(encoding="utf-8"))["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return True  # let onnxruntime-genai say what is wrong with it
    kv_cache = decoder.get("kv_cache") if isinstance(decoder, dict) else None
    return not (isinstance(kv_cache, dict) and "onnxruntime_genai" in kv_cache)


# --- llama.cpp ------------------------------------------------------------------------------------------------


# llama.cpp's extra weight buffer types, off only on AMX CPUs where they crash (peers.llama_cpp_extra_buffers)
LLAMA_CPP_EXTRA_BUFTS = llama_cpp_extra_buffers()
_LLAMA_LOG_NOTHING = None  # the C callback that drops llama.cpp's log lines, made on first use


def _llama_log_nothing():
    global _LLAMA_LOG_NOTHING
    if _LLAMA_LOG_NOTHING is None:
        import llama_cpp

        _LLAMA_LOG_NOTHING = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    return _LLAMA_LOG_NOTHING


class LlamaCppSession:
    """llama.cpp through llama-cpp-python's C API (the ``Llama`` class cannot turn the extra buffer types
    off, and with ``logits_all=False`` it no longer keeps the logits): one sequence, greedy."""

    def __init__(self, path: Path, threads: int, max_tokens: int):
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_log_set(_llama_log_nothing(), None)  # its load log would fill the worker's stderr
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = LLAMA_CPP_EXTRA_BUFTS
        self.model = llama_cpp.llama_model_load_from_file(os.fspath(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = max_tokens
        ctx_params.n_batch = ctx_params.n_ubatch = 512
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model)))
        self.n_tokens = self.marked = 0
        self._info = {
            "llama_cpp": llama_cpp.__version__,
            "threads": threads,
            "use_extra_bufts": LLAMA_CPP_EXTRA_BUFTS,
            "weight_bytes_per_step": gguf_weight_bytes(path),
        }

    def _eval(self, ids: Sequence[int], chunk: int = 512) -> int:
        """Run ``ids`` after the cache (``chunk`` per llama_decode) and return the argmax of the last logits."""
        for start in range(0, len(ids), chunk):
            part = list(ids[start : start + chunk])
            tokens = (self.lib.llama_token * len(part))(*part)
            rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(part)))
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.n_tokens += len(part)
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)  # (vocab,) f32 of the batch's last token
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.vocab_size,))))

    def _drop_after(self, length: int) -> None:
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), 0, length, -1)
        self.n_tokens = length

    def prefill(self, ids: Sequence[int], chunk: int) -> int:
        self._drop_after(0)
        return self._eval(ids, min(chunk, 512))

    def decode(self, token: int) -> int:
        return self._eval([token])

    def mark(self) -> None:
        self.marked = self.n_tokens

    def rewind(self) -> None:
        self._drop_after(self.marked)

    def info(self) -> dict:
        return self._info

    def __del__(self):
        lib = getattr(self, "lib", None)
        if lib is not None:
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)


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
            "onnxruntime",
            "onnxruntime CPUExecutionProvider on the artifact",
            _is_artifact,
            lambda: None,
            _open_ort,
            batched=True,
            speculates=True,
        ),
        Backend(
            "onnxruntime-cuda",
            "onnxruntime CUDAExecutionProvider (KV cache on the host)",
            _is_artifact,
            _cuda_unavailable,
            _open_ort_cuda,
            optional=True,
            speculates=True,
        ),
        Backend(
            "torch-kernels",
            "quantlab's native runtime: one C++ call per decoder layer (torch for the rest), on quantized artifacts",
            lambda t: t.kind == ARTIFACT and t.quantized and t.producer == "quantlab",
            _torch_kernels_unavailable,
            _open_torch_kernels,
            batched=True,  # DecoderSession's batch path: the native layers take the mask and positions
            speculates=True,
        ),
        Backend(
            "onnxruntime-genai",
            "onnxruntime-genai's generation loop (greedy search, its own KV cache) on the artifact",
            _has_genai_config,
            _genai_unavailable,
            lambda path, *, threads, max_tokens: GenaiSession(path, threads, max_tokens),
            batched=True,
            rewinds=False,
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
