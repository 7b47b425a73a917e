"""Tokenizers against independent oracles: SentencePiece for tok512, golden ids for stories260K and SmolLM2."""

from __future__ import annotations

import json

import pytest

from quantlab.errors import InputError
from quantlab.io import TokenizerSpec, load_checkpoint
from quantlab.runtime.tokenizer import (
    Llama2cTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    render_chatml,
    tokenizer_from_spec,
    write_tokenizer_files,
)

STORY_START = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def smollm2_spec(require_model):
    return load_checkpoint(require_model("SmolLM2-135M-Instruct.Q4_1.gguf")).tokenizer


@pytest.fixture(scope="module")
def smollm2_golden(require_golden):
    return {case["name"]: case for case in json.loads(require_golden("smollm2_greedy.json").read_text())["cases"]}


def test_llama2c_decodes_golden_story(require_model, require_golden):
    golden = json.loads(require_golden("stories260K_greedy.json").read_text())
    tok = Llama2cTokenizer(require_model("tok512.bin"))
    assert golden["ids"][0] == tok.bos_token_id == 1
    text = tok.decode(golden["ids"])
    assert text.startswith(STORY_START)
    assert text == golden["text"]


@pytest.mark.parametrize(
    "text", ["Once upon a time", "Lily's mom said, \"Let's go!\"\nThe end.", "naïve café ☃ 🙂", ""]
)
def test_llama2c_encode_matches_sentencepiece(require_model, text):
    ours = Llama2cTokenizer(require_model("tok512.bin"))
    oracle = SentencePieceTokenizer(require_model("tok512.model"))
    assert ours.encode(text, add_bos=False) == oracle.encode(text, add_bos=False)
    assert ours.encode(text, add_bos=True) == oracle.encode(text, add_bos=True)
    assert ours.decode(ours.encode(text, add_bos=True)) == text


def test_llama2c_run_c_details(require_model):
    tok = Llama2cTokenizer(require_model("tok512.bin"))
    assert tok.encode("Once upon a time", add_bos=True) == [1, 403, 407, 261, 378]
    assert tok.encode("") == [1]  # no dummy prefix for empty text
    assert tok.decode([1, 403]) == "Once"  # leading space dropped after BOS
    assert tok.decode([403]) == " Once"
    assert tok.decode([byte + 3 for byte in "é".encode()]) == "é"  # <0xXX> tokens are raw bytes
    assert tok.eos_token_ids == {2}


def test_smollm2_prompt_ids_match_golden(smollm2_spec, smollm2_golden):
    tok = tokenizer_from_spec(smollm2_spec)
    story, chat = smollm2_golden["story"], smollm2_golden["chat-capital"]
    assert tok.encode(story["prompt"]) == story["prompt_ids"]  # the GGUF says: no BOS
    assert tok.encode_chat(chat["prompt"]) == chat["prompt_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": chat["prompt"]}]) == render_chatml(
        [{"role": "user", "content": chat["prompt"]}]
    )
    assert 2 in tok.eos_token_ids  # <|im_end|>, where the chat answer stops


def test_smollm2_decodes_golden_text(smollm2_spec, smollm2_golden):
    tok = tokenizer_from_spec(smollm2_spec)
    for case in smollm2_golden.values():
        assert tok.decode(case["greedy_ids"]) == case["text"]


def test_artifact_round_trip_hf_json(smollm2_spec, smollm2_golden, tmp_path):
    written = write_tokenizer_files(smollm2_spec, tmp_path)
    assert written == ["tokenizer.json", "tokenizer_config.json", "tokenizer_info.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["chat_template"] == smollm2_spec.chat_template
    tok = load_tokenizer(tmp_path)
    chat = smollm2_golden["chat-capital"]
    assert tok.encode_chat(chat["prompt"]) == chat["prompt_ids"]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == set(smollm2_spec.eos_token_ids)


def test_artifact_round_trip_llama2c(require_model, tmp_path):
    spec = load_checkpoint(require_model("stories260K.bin")).tokenizer
    assert write_tokenizer_files(spec, tmp_path) == ["tokenizer.bin", "tokenizer.model", "tokenizer_info.json"]
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, Llama2cTokenizer)
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.encode_chat("hi")[0] == 1


def test_artifact_round_trip_sentencepiece(require_model, tmp_path):
    spec = TokenizerSpec(
        kind="sentencepiece", path=str(require_model("tok512.model")), bos_token_id=1, eos_token_ids=(2,)
    )
    write_tokenizer_files(spec, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.decode([1, 403, 407, 261, 378, 2]) == "Once upon a time"


def test_jinja_template_and_chatml_fallback(require_model):
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    template += "{% if add_generation_prompt %}[assistant]{% endif %}"
    tok = Llama2cTokenizer(require_model("tok512.bin"), chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "\n<s>\n[user] hi[assistant]"
    plain = Llama2cTokenizer(require_model("tok512.bin"))
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    want = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    assert plain.apply_chat_template(messages) == want


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(InputError) as e:
        load_tokenizer(tmp_path)
    assert e.value.path.endswith("tokenizer_info.json")
    (tmp_path / "tokenizer_info.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(InputError) as e:
        load_tokenizer(tmp_path)
    assert e.value.field == "kind"
