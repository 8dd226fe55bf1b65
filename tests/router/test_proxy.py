"""select-proxy: a classifier over sentence embeddings picks the public documents that look like the domain."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe import api
from flexmoe.config import Device, ProxyConfig
from flexmoe.data import load_documents
from flexmoe.errors import ConfigError, OutputExistsError
from flexmoe.router.proxy import fit_logistic


@pytest.fixture(scope="module")
def planted(tmp_path_factory, corpus_writer):
    """Public prose with 10 code documents planted among 90; the domain is other code. The embedder is a
    bag of words (`bow_embedder`), so the classifier, not the embedder, is what is tested."""
    write_corpus = corpus_writer
    root = tmp_path_factory.mktemp("proxy")
    prose = write_corpus(root / "prose.jsonl", "public", 90, seed=11).read_text().splitlines()
    code = write_corpus(root / "code.jsonl", "code", 10, seed=12).read_text().splitlines()
    mixed = prose[:45] + code[:5] + prose[45:] + code[5:]
    (root / "public.jsonl").write_text("\n".join(mixed) + "\n")
    planted = {json.loads(line)["text"] for line in code}
    return root / "public.jsonl", planted


@pytest.fixture
def inputs(train_inputs, bow_embedder):
    return train_inputs.code, bow_embedder


def _cfg(inputs, public, **kw) -> ProxyConfig:
    domain, embedder = inputs
    return ProxyConfig(**{"public": [public], "domain": [domain], "embedder": embedder, "fraction": 0.1,
                          "num_domain_docs": 30, "device": Device.CPU, **kw})


def test_picks_the_planted_domain_documents_deterministically(inputs, planted, tmp_path):
    public, code = planted
    r = api.select_proxy(_cfg(inputs, public), tmp_path / "a.jsonl", progress=False)
    assert (r.selected, r.public_docs, r.domain_docs) == (10, 100, 30)
    chosen = load_documents([tmp_path / "a.jsonl"]).texts  # readable as training data
    assert set(chosen) == code
    order = [json.loads(line)["text"] for line in (public).read_text().splitlines()]
    assert [order.index(t) for t in chosen] == sorted(order.index(t) for t in chosen)  # corpus order kept
    api.select_proxy(_cfg(inputs, public), tmp_path / "b.jsonl", progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_max_public_docs_scores_a_sample(inputs, planted, tmp_path):
    public, _ = planted
    r = api.select_proxy(_cfg(inputs, public, max_public_docs=40, fraction=0.25), tmp_path / "s.jsonl",
                         progress=False)
    assert (r.public_docs, r.selected) == (40, 10)


def test_fit_logistic_separates_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g) + 5.0  # a large shared offset, as sentence embeddings have
    y = (x[:, 3] > 5.0).double()
    w, b = fit_logistic(x, y)
    assert ((x.double() @ w + b > 0).double() == y).double().mean() > 0.97
    w2, b2 = fit_logistic(x, y)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_refusals(inputs, planted, tmp_path):
    public, _ = planted
    with pytest.raises(ConfigError, match="fraction"):
        ProxyConfig(public=[public], domain=[public], embedder=inputs[1], fraction=0)
    with pytest.raises(ConfigError, match="jsonl"):
        api.select_proxy(_cfg(inputs, public), tmp_path / "out.txt", progress=False)
    (tmp_path / "taken.jsonl").write_text("")
    with pytest.raises(OutputExistsError):
        api.select_proxy(_cfg(inputs, public), tmp_path / "taken.jsonl", progress=False)
