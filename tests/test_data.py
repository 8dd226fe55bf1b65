from __future__ import annotations

import gzip
import json

import pytest
import torch

from flexmoe.data import PackedData, load_documents, pack, tokenize_stream
from flexmoe.errors import DataError
from flexmoe.testing import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_loads_jsonl_txt_gz_and_folders(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ["one", "  ", "two"])  # blank documents are dropped
    (tmp_path / "b.txt").write_text("a whole\nfile\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "three"}) + "\n")
    docs = load_documents([tmp_path / "a.jsonl", tmp_path / "b.txt", tmp_path / "c.jsonl.gz"])
    assert docs.texts == ["one", "two", "a whole\nfile\n", "three"] and docs.files == 3
    folder = load_documents([tmp_path])  # a folder: every supported file, sorted
    assert folder.texts == docs.texts
    assert docs.summary(tokens=7).to_json() == {"files": 3, "documents": 4, "bytes": 3 + 3 + 13 + 5, "tokens": 7}


def test_loads_parquet_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta"], "n": [1, 2]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for p in ("d.parquet", "saved", "saved_dict"):
        assert load_documents([tmp_path / p]).texts == ["alpha", "beta"], p


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing.jsonl", "does not exist"),
    (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "unsupported"),
    (lambda p: (p / "e.jsonl").write_text("\n\n") and p / "e.jsonl", "empty"),
    (lambda p: (p / "j.jsonl").write_text("{bad\n") and p / "j.jsonl", "j.jsonl:1: not valid JSON"),
    (lambda p: (p / "f.jsonl").write_text('{"body": "x"}\n') and p / "f.jsonl", "no string field 'text'"),
    (lambda p: (p / "d").mkdir() or p / "d", "holds no"),
])
def test_bad_data_is_one_clear_error(tmp_path, setup, message):
    with pytest.raises(DataError, match=message) as e:
        load_documents([setup(tmp_path)])
    assert "\n" not in str(e.value)


def test_pack_joins_with_eos_and_shifts_targets(tmp_path, tokenizer):
    docs = load_documents([_jsonl(tmp_path / "a.jsonl", [" ".join(["w5"] * 30), " ".join(["w6"] * 50)])])
    data, summary = pack(docs, tokenizer, seq_len=16, seed=0, progress=False)
    assert summary.tokens == 30 + 50 + 2 == data.tokens.numel()  # one EOS after each document
    assert int((data.tokens == tokenizer.eos_token_id).sum()) == 2
    assert data.num_blocks == (82 - 1) // 16
    inputs, targets = data.batch(0, 3)
    assert inputs.shape == targets.shape == (3, 16) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_block_order_is_seeded_and_covers_each_epoch(tokenizer):
    tokens = torch.arange(1001, dtype=torch.int32)
    a, b, c = PackedData(tokens, 10, seed=0), PackedData(tokens, 10, seed=0), PackedData(tokens, 10, seed=1)
    assert torch.equal(a.block_ids(0, 250), b.block_ids(0, 250))
    assert not torch.equal(a.block_ids(0, 100), c.block_ids(0, 100))
    for epoch in range(2):  # every block once per epoch, in a different order each epoch
        assert sorted(a.block_ids(100 * epoch, 100).tolist()) == list(range(100))
    assert not torch.equal(a.block_ids(0, 100), a.block_ids(100, 100))
    # a position is all a resumed run needs: batch(p) is the same whatever was read before
    assert torch.equal(a.batch(137, 4)[0], PackedData(tokens, 10, seed=0).batch(137, 4)[0])


def test_too_little_data_and_no_eos(tokenizer):
    with pytest.raises(DataError, match="fewer than one sequence"):
        PackedData(torch.arange(10, dtype=torch.int32), 16)

    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="no EOS"):
        tokenize_stream(["x"], NoEos())


def test_long_documents_are_tokenized_in_pieces_to_the_same_tokens(tokenizer, monkeypatch):
    """Pieces cut before whitespace runs give the whole text's tokens (word-level and byte-level BPE alike); a
    text without whitespace is cut at the piece length. Every document still ends in exactly one EOS."""
    import random

    from flexmoe import data as data_mod
    from flexmoe.anchor.train import train_bpe as _train_bpe

    rng = random.Random(0)
    words = ["w5", "w17", "darkness", "x", "!", "a.b", "12"]
    docs = ["".join(rng.choice(words) + rng.choice([" ", "  ", "\n", " \n\t ", ""]) for _ in range(400))
            for _ in range(5)]
    bpe = _train_bpe(docs, 300)
    whole = [tokenize_stream(docs, t, progress=False) for t in (tokenizer, bpe)]
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 37)
    monkeypatch.setattr(data_mod, "BATCH_CHARS", 100)
    for d in docs + ["ab" * 300]:
        pieces = list(data_mod._pieces(d, 37))
        assert "".join(pieces) == d and max(map(len, pieces)) <= 37 and len(pieces) > len(d) // 37
    for tok, expected in zip((tokenizer, bpe), whole):
        assert torch.equal(tokenize_stream(docs, tok, progress=False), expected)
    cut = tokenize_stream(docs + ["ab" * 300], bpe, progress=False)
    assert int((cut == bpe.eos_token_id).sum()) == len(docs) + 1
