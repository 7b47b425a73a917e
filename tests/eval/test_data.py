"""Token data: the file formats, their validation, and text sampled from a model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.errors import InputError
from quantlab.eval.data import PAD_ID, load_token_data, make_token_data, sample_from_model, token_sha256


class ByteTokenizer:
    """One id per UTF-8 byte, offset by 3 (0 pad, 1 BOS, 2 EOS): enough to test the data formats."""

    bos_token_id = 1
    eos_token_ids = {2}
    add_bos_default = True

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return [self.bos_token_id] * add_bos + [b + 3 for b in text.encode("utf-8")]


TOK = ByteTokenizer()


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_text_is_cut_into_consecutive_windows_after_bos(tmp_path):
    data = load_token_data(write(tmp_path / "eval.txt", "abcdefghij"), TOK, seq_len=4)
    ids = [1, *(b + 3 for b in b"abcdefghij")]  # 11 tokens: BOS + 10 bytes
    assert data.ids.dtype == np.int64 and data.ids.shape == (3, 4)
    assert data.ids[0].tolist() == ids[:4] and data.ids[1].tolist() == ids[4:8]
    assert data.ids[2].tolist() == [*ids[8:], PAD_ID]  # the last window is shorter, right-padded
    assert data.lengths.tolist() == [4, 4, 3]
    assert data.source.endswith("eval.txt")
    assert load_token_data(tmp_path / "eval.txt", TOK, seq_len=4, max_sequences=2).ids.shape == (2, 4)


def test_jsonl_documents_are_tokenized_one_by_one_and_cut(tmp_path):
    path = write(tmp_path / "eval.jsonl", '{"text": "abc"}\n\n{"text": "defghij", "id": 7}\n')
    data = load_token_data(path, TOK, seq_len=5)
    assert data.ids.tolist() == [[1, 100, 101, 102, PAD_ID], [1, 103, 104, 105, 106]]
    assert data.lengths.tolist() == [4, 5]


def test_npy_and_json_ids_are_used_as_given(tmp_path):
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.save(tmp_path / "ids.npy", ids)
    from_npy = load_token_data(tmp_path / "ids.npy", vocab_size=12)
    assert from_npy.ids.tolist() == ids.tolist() and from_npy.lengths.tolist() == [4, 4, 4]
    write(tmp_path / "ids.json", json.dumps(ids.tolist()))
    from_json = load_token_data(tmp_path / "ids.json", vocab_size=12)
    assert from_json.sha256 == from_npy.sha256  # the same tokens, the same hash, whatever the file
    assert load_token_data(tmp_path / "ids.npy", seq_len=2).ids.tolist() == ids[:, :2].tolist()
    ragged = load_token_data(write(tmp_path / "ragged.json", "[[5, 6, 7], [8]]"))
    assert ragged.ids.tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID]] and ragged.lengths.tolist() == [3, 1]


def test_token_data_is_frozen_and_hashes_ids_shape_and_lengths():
    data = make_token_data(np.array([[1, 2], [3, 4]]), "x")
    with pytest.raises(ValueError):
        data.ids[0, 0] = 9
    assert data.sha256 == token_sha256(np.array([[1, 2], [3, 4]]), np.array([2, 2]))
    assert data.sha256 != make_token_data(np.array([[1, 2, 3, 4]]), "x").sha256  # same bytes, other shape
    assert data.sha256 != make_token_data(np.array([[1, 2], [3, 4]]), "x", lengths=[2, 1]).sha256
    assert data.describe() == {"source": "x", "sequences": 2, "seq_len": 2, "sha256": data.sha256}


@pytest.mark.parametrize(
    ("name", "content", "where", "message"),
    [
        ("bad.jsonl", '{"text": "a"}\n{"text": oops}\n', "line 2", "not valid JSON"),
        ("bad.jsonl", '{"text": "a"}\n\n{"txt": "b"}\n', "line 3", '"text"'),
        ("bad.jsonl", '{"text": 5}\n', "line 1: text", "expected a string"),
        ("bad.jsonl", '{"text": ""}\n', "line 1: text", "empty"),
        ("bad.json", "[[1, 2], [3, 4.5]]", "[1][1]", "integer token id"),
        ("bad.json", '[[1, "2"]]', "[0][1]", "integer token id"),
        ("bad.json", "[[1, 2], [3, -1]]", "[1][1]", "integer token id"),
        ("bad.json", "[[1, 2],\n [3, 4]", "line 2", "not valid JSON"),
        ("bad.json", "[1, 2]", None, "list of lists"),
        ("oov.json", "[[1, 2], [3, 600]]", "sequence 1, position 1", "outside the vocabulary"),
        ("empty.txt", " \n", None, "no token data"),
        ("empty.jsonl", "\n", None, "no token data"),
        ("empty.json", "[[]]", None, "no token data"),
        ("latin1.txt", "caf\xe9", None, "not UTF-8"),
    ],
)
def test_bad_files_raise_input_error_naming_file_and_place(tmp_path, name, content, where, message):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1") if name == "latin1.txt" else content.encode("utf-8"))
    with pytest.raises(InputError) as info:
        load_token_data(path, TOK, vocab_size=512)
    assert info.value.path == str(path)
    if where:
        assert info.value.field == where
    assert message in info.value.message


def test_bad_npy_files_raise_input_error(tmp_path):
    np.save(tmp_path / "float.npy", np.zeros((2, 3), dtype=np.float32))
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), dtype=np.int64))
    np.save(tmp_path / "oov.npy", np.array([[1, 2], [3, 512]]))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for name, field in [
        ("float.npy", "dtype"),
        ("cube.npy", "shape"),
        ("oov.npy", "sequence 1, position 1"),
        ("junk.npy", None),
    ]:
        with pytest.raises(InputError) as info:
            load_token_data(tmp_path / name, vocab_size=512)
        assert info.value.path == str(tmp_path / name) and info.value.field == field
    with pytest.raises(InputError, match="not found"):
        load_token_data(tmp_path / "missing.txt", TOK)
    with pytest.raises(InputError, match="tokenizer"):
        load_token_data(write(tmp_path / "a.txt", "abc"))


def test_real_tokenizer_text_starts_with_bos(stories_fp32, tmp_path):
    from quantlab.runtime.tokenizer import load_tokenizer

    data = load_token_data(write(tmp_path / "t.txt", "Once upon a time"), load_tokenizer(stories_fp32), vocab_size=512)
    assert data.ids.shape[0] == 1 and data.ids[0, 0] == 1 and data.lengths[0] > 2


@pytest.fixture(scope="module")
def decoder(stories_fp32):
    from quantlab.runtime.generate import OrtDecoder

    return OrtDecoder(stories_fp32, threads=1)


def test_sampling_is_deterministic_per_seed_and_differs_across_seeds(decoder):
    first = sample_from_model(decoder, 4, 24, seed=0, bos_id=1)
    assert first.shape == (4, 24) and first.dtype == np.int64
    assert np.all(first[:, 0] == 1) and np.all((first >= 0) & (first < 512))
    np.testing.assert_array_equal(first, sample_from_model(decoder, 4, 24, seed=0, bos_id=1))
    other = sample_from_model(decoder, 4, 24, seed=1, bos_id=1)
    assert all(not np.array_equal(first[i], other[i]) for i in range(4))
    assert len({tuple(row) for row in first.tolist()}) == 4  # the sequences of one batch differ too


def test_sampling_batched_equals_unbatched(decoder):
    batched = sample_from_model(decoder, 4, 24, seed=3, bos_id=1)
    for i in range(4):
        alone = sample_from_model(decoder, 1, 24, seed=3, bos_id=1, first_index=i)
        np.testing.assert_array_equal(batched[i], alone[0])
    np.testing.assert_array_equal(batched[2:], sample_from_model(decoder, 2, 24, seed=3, bos_id=1, first_index=2))
