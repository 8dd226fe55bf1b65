from __future__ import annotations

import pytest
import torch

from flexmoe.data import load_documents
from flexmoe.router.embed import (check_same_embedder, embedder_identity, mean_embedding, read_row_file,
                           write_row_file)
from flexmoe.errors import CheckpointError, ConfigError


def test_identity_names_dimension_and_weights(train_inputs):
    a = embedder_identity(train_inputs.embedder)
    assert a.dim == 32 and a.name == "embedder" and len(a.sha256) == 64
    assert embedder_identity(train_inputs.embedder) == a  # stable
    b = embedder_identity(train_inputs.embedder48)
    assert b.dim == 48 and b.sha256 != a.sha256
    with pytest.raises(ConfigError, match="dimension 48.*dimension 32"):
        check_same_embedder(b, a, "embedder x")
    with pytest.raises(ConfigError, match="differs from the anchor's embedder"):
        check_same_embedder(type(a)(name="other", dim=32, sha256="0" * 64), a, "embedder y")
    check_same_embedder(a, None, "anything goes without a recorded embedder")


def test_not_an_embedder(tmp_path):
    with pytest.raises(ConfigError, match="not a local sentence-transformers folder"):
        embedder_identity(tmp_path)


def test_mean_embedding_is_deterministic_for_a_seed(train_inputs):
    docs = load_documents([train_inputs.code]).texts
    a = mean_embedding(docs, train_inputs.embedder, num_docs=10, seed=0, progress=False)
    b = mean_embedding(docs, train_inputs.embedder, num_docs=10, seed=0, progress=False)
    c = mean_embedding(docs, train_inputs.embedder, num_docs=10, seed=1, progress=False)
    assert a.row.dtype == torch.float32 and a.row.shape == (32,) and a.num_docs == 10
    assert torch.equal(a.row, b.row)
    assert not torch.allclose(a.row, c.row)  # another sample of 10 of the 60 documents
    other = mean_embedding(load_documents([train_inputs.speeches]).texts, train_inputs.embedder, num_docs=10,
                           progress=False)
    assert not torch.allclose(a.row, other.row, atol=1e-3)  # domains differ


def test_long_documents_are_chunked_and_capped(train_inputs):
    long_doc = " ".join(["the lord said"] * 2000)  # far past the embedder's 128 tokens
    one = mean_embedding([long_doc], train_inputs.embedder, max_chunks_per_doc=5, progress=False)
    assert one.num_docs == 1 and one.num_chunks == 5
    short = mean_embedding(["the lord said"], train_inputs.embedder, progress=False)
    assert short.num_chunks == 1


def test_a_50_mb_document_is_embedded_from_spread_windows(train_inputs):
    """Not tokenized whole (gigabytes of offsets): one chunk from each of max_chunks_per_doc spread windows."""
    import time

    huge = ("the lord said " * 3_600_000)[:50_000_000] + " and it was good"
    t0 = time.perf_counter()
    one = mean_embedding([huge], train_inputs.embedder, max_chunks_per_doc=4, progress=False)
    assert one.num_chunks == 4 and torch.isfinite(one.row).all() and time.perf_counter() - t0 < 20


def test_row_file_round_trip(train_inputs, tmp_path):
    emb = mean_embedding(load_documents([train_inputs.code]).texts, train_inputs.embedder, num_docs=5,
                         progress=False)
    ident = embedder_identity(train_inputs.embedder)
    path = write_row_file(tmp_path / "code.row.safetensors", emb, ident)
    rows = read_row_file(path)
    assert torch.equal(rows.row, emb.row) and rows.embedder == ident
    assert (rows.num_docs, rows.num_chunks, rows.seed) == (emb.num_docs, emb.num_chunks, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["code.row.safetensors"]  # no temp file left
    with pytest.raises(CheckpointError, match="not a router-row file"):
        read_row_file(train_inputs.anchor / "flexmoe_router.safetensors")


def test_a_document_is_judged_by_all_its_chunks_not_its_opening(train_inputs):
    """select-proxy and router rows share `document_embeddings`: text past the embedder's length counts."""
    from flexmoe.router.embed import document_embeddings, load_embedder

    model = load_embedder(train_inputs.embedder)
    opening = " ".join(["the lord said"] * 60)  # past the 128-token limit on its own
    a, b = opening + " " + " ".join(["def x return y"] * 60), opening + " " + " ".join(["and it was good"] * 60)
    (emb, chunks) = document_embeddings([a, b, opening], model, progress=False)
    assert chunks >= 6 and len(model.tokenizer) > 100
    assert not torch.allclose(emb[0], emb[1])  # same opening, different rest: different documents
    first_only = model.encode([a[:200]], convert_to_tensor=True, normalize_embeddings=True).double()[0]
    assert not torch.allclose(emb[0], first_only)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=0.2)  # means of unit vectors
