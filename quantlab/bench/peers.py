"""The peers' own artifacts of one GGUF checkpoint, made with the peers' own tools, for ``quantlab bench``:

    GGUF (any type) --gguf package--> f32 GGUF --llama_model_quantize--> q4_0 / q4_K_M GGUF   (llama.cpp)
    GGUF --transformers (gguf_file=)--> HF folder --onnxruntime_genai.models.builder--> int4 ONNX (genai)

Every function writes to a ``.partial`` name and renames, so a file that is there is whole, and each
returns the command it ran, for the benchmark's JSON.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# llama.cpp quantization types by the names its tools print (llama-quantize's argument) -> llama_ftype constant
LLAMA_FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}


def llama_cpp_extra_buffers(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether llama.cpp may put quantized weights in its extra buffer types (repacked Q4/Q8 layouts, AMX
    tiles), its fastest CPU path. Not on a CPU with AMX: there llama-cpp-python 0.3.36's AMX matmul
    (ggml_backend_amx_mul_mat) dies with SIGSEGV on every quantized GGUF (seen on Sapphire Rapids), and
    use_extra_bufts=False leaves ggml's plain kernels, as llama.cpp's --no-repack does. Every row records it."""
    try:
        flags = cpuinfo.read_text(encoding="utf-8").split()
    except OSError:
        return True
    return "amx_int8" not in flags and "amx_tile" not in flags


def write_f32_gguf(source: Path, out: Path) -> str:
    """``source`` with every tensor dequantized to F32, all metadata and the tokenizer kept."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    writer.data_alignment = reader.alignment
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # GGUFWriter writes these itself
        value, kind = field.contents(), field.types[0]
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub_type)
    tensors = [(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)) for t in reader.tensors]
    for name, data in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in tensors:
        writer.write_tensor_data(data)
    writer.close()
    tmp.replace(out)
    return f"gguf: dequantize every tensor of {source.name} to F32 -> {out.name}"


def llama_quantize(f32: Path, out: Path, kind: str, threads: int = 2) -> str:
    """llama.cpp's own quantizer (no importance matrix), ``kind`` one of LLAMA_FTYPES or a llama_cpp
    ``LLAMA_FTYPE_*`` constant's name."""
    import llama_cpp

    ftype = LLAMA_FTYPES.get(kind, kind)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads
    tmp = out.with_name(out.name + ".partial")
    rc = llama_cpp.llama_model_quantize(os.fspath(f32).encode(), os.fspath(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({f32.name}, {kind}) returned {rc}")
    tmp.replace(out)
    return f"llama_cpp.llama_model_quantize({f32.name}, {out.name}, ftype={ftype}, nthread={threads})"


def hf_folder_from_gguf(source: Path, out: Path) -> str:
    """A Hugging Face folder (fp32 safetensors + tokenizer) that transformers reads out of the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers marks a model read from a GGUF as quantized and refuses to save it; its weights are
    # plain fp32 tensors by now, so dropping the mark saves exactly what it loaded
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp)
    tmp.replace(out)
    return f"AutoModelForCausalLM.from_pretrained({source.parent.name}, gguf_file={source.name}).save_pretrained"


def genai_builder(hf_folder: Path, out: Path, precision: str = "int4", cache: Path | None = None) -> str:
    """onnxruntime-genai's model builder for the CPU, as its README runs it."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", os.fspath(hf_folder)]
    command += ["-o", os.fspath(tmp), "-p", precision, "-e", "cpu"]
    command += ["-c", os.fspath(cache or out.with_name(out.name + ".cache"))]
    logger.info("%s", " ".join(command))
    subprocess.run(command, check=True, capture_output=True, text=True)
    tmp.replace(out)
    return f"python -m onnxruntime_genai.models.builder -i {hf_folder.name} -o {out.name} -p {precision} -e cpu"
