"""Router rows from a sentence embedder: the mean embedding of a domain's documents (FLEXOLMO.md §2).

The embedder is any local sentence-transformers folder; nothing is downloaded (`local_files_only`).
Long documents are cut, with the embedder's own tokenizer, into chunks of its maximum length; a document's
embedding is the mean of its (unit-normalised) chunk embeddings and the row is the mean over documents. A document
longer than `SCAN_CHARS` characters is not tokenized whole: its chunks come from evenly spread windows of it, so
a 50 MB document costs what a 1 MB one does.
Rows stay in the embedder's space here; `Anchor.to_model_space` maps them to the model's hidden size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.io.anchor import EmbedderIdentity
from flexmoe.io.atomic import atomic_write_bytes
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import TensorSpec, encode_header, tensor_bytes

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")
SCAN_CHARS = 2**20  # the most characters of one document the embedder's tokenizer is given


@dataclass
class MeanEmbedding:
    row: torch.Tensor  # (dim,) float32, raw embedder space
    num_docs: int
    num_chunks: int
    seed: int


@dataclass
class RowFile:
    row: torch.Tensor  # (dim,) float32
    embedder: EmbedderIdentity
    num_docs: int
    num_chunks: int
    seed: int


def _check_folder(path: Path) -> Path:
    path = Path(path)
    if not (path / "modules.json").is_file():
        raise ConfigError(f"embedder {path} is not a local sentence-transformers folder (no modules.json); "
                          "pass the folder a SentenceTransformer was saved to")
    return path


def embedder_identity(path: str | Path) -> EmbedderIdentity:
    """Name, output dimension and a sha256 over the embedder's weight files (path + bytes, sorted)."""
    path = _check_folder(Path(path))
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ConfigError(f"embedder {path} has no weight files")
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(2**24), b""):
                h.update(block)
    return EmbedderIdentity(name=_embedder_name(path), dim=_embedder_dim(path), sha256=h.hexdigest())


def _embedder_name(path: Path) -> str:
    """The folder's name (its parent's where the folder is generically called `model`); informational only."""
    path = path.resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def _embedder_dim(path: Path) -> int:
    """Output dimension from the saved module configs, without loading the model."""
    dim = None
    for mod in json.loads((path / "modules.json").read_text()):
        cfg_dir = path / mod.get("path", "")
        f = cfg_dir / "config.json"
        if not f.is_file():
            continue
        cfg = json.loads(f.read_text())
        # Transformer (hidden_size), Pooling (embedding_dimension, older: word_embedding_dimension), Dense.
        for key in ("out_features", "embedding_dimension", "word_embedding_dimension", "hidden_size"):
            if isinstance(cfg.get(key), int):
                dim = cfg[key]
                break
    if dim is None:
        raise ConfigError(f"embedder {path}: cannot tell its output dimension from its module configs")
    return dim


def load_embedder(path: str | Path, device: str = "cpu"):
    """A `SentenceTransformer` from a local folder; never touches the network."""
    from sentence_transformers import SentenceTransformer

    path = _check_folder(Path(path))
    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"embedder {path} failed to load ({str(e).splitlines()[0]})") from None


def _chunks(text: str, tokenizer, max_tokens: int, max_chunks: int) -> list[str]:
    """Character slices of `text` of at most `max_tokens` embedder tokens, at most `max_chunks`, spread evenly."""
    if len(text) > SCAN_CHARS:  # one chunk from the start of each of `max_chunks` evenly spread windows
        width = SCAN_CHARS // max_chunks
        starts = torch.linspace(0, len(text) - width, max_chunks).round().long().tolist()
        return [c for s in starts for c in _chunks(text[s:s + width], tokenizer, max_tokens, 1)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    if not offsets:
        return [text[:2000]]
    starts = list(range(0, len(offsets), max_tokens))
    if len(starts) > max_chunks:
        pick = torch.linspace(0, len(starts) - 1, max_chunks).round().long().tolist()
        starts = [starts[i] for i in pick]
    return [text[offsets[s][0]:offsets[min(s + max_tokens, len(offsets)) - 1][1]] for s in starts]


def document_embeddings(docs: Sequence[str], embedder, *, batch_size: int = 32, max_chunks_per_doc: int = 8,
                        progress: bool = True) -> tuple[torch.Tensor, int]:
    """((N, dim) float64 embedding of each document, chunks embedded): a document's embedding is the mean of its
    unit-normalised chunk embeddings, chunks of the embedder's maximum length spread evenly over the document.
    `embedder` is a loaded `SentenceTransformer` (`load_embedder`)."""
    tokenizer = embedder.tokenizer
    special = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 2
    max_tokens = max(8, int(embedder.max_seq_length or 512) - special)
    chunks: list[str] = []
    owner: list[int] = []
    for d, text in enumerate(docs):
        # A tokenizer that is not a transformers one (a bag-of-words module) has no length limit to chunk by.
        pieces = _chunks(text, tokenizer, max_tokens, max_chunks_per_doc) if callable(tokenizer) else [text]
        chunks += pieces
        owner += [d] * len(pieces)
    with torch.inference_mode():
        emb = embedder.encode(chunks, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                              show_progress_bar=progress)  # (num_chunks, dim)
    emb = emb.double().cpu()
    index = torch.tensor(owner)
    per_doc = torch.zeros(len(docs), emb.shape[1], dtype=torch.float64).index_add_(0, index, emb)
    return per_doc / torch.bincount(index, minlength=len(docs)).unsqueeze(1), len(chunks)


def mean_embedding(docs: Sequence[str], embedder_path: str | Path, *, num_docs: int = 1000, seed: int = 0,
                   batch_size: int = 32, max_chunks_per_doc: int = 8, device: str = "cpu",
                   progress: bool = True) -> MeanEmbedding:
    """Mean embedding of up to `num_docs` documents sampled with `seed` (the same sample for the same seed)."""
    if not docs:
        raise ConfigError("no documents to embed")
    if num_docs < 1:
        raise ConfigError(f"num_docs must be >= 1, got {num_docs}")
    model = load_embedder(embedder_path, device)
    pick = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))[:num_docs].tolist()
    per_doc, num_chunks = document_embeddings([docs[i] for i in pick], model, batch_size=batch_size,
                                              max_chunks_per_doc=max_chunks_per_doc, progress=progress)
    return MeanEmbedding(row=per_doc.mean(0).float(), num_docs=len(pick), num_chunks=num_chunks, seed=seed)


def write_row_file(path: str | Path, emb: MeanEmbedding, identity: EmbedderIdentity) -> Path:
    """Write a router-row file (docs/FORMAT.md) atomically."""
    path = Path(path)
    row = emb.row.detach().float().reshape(-1).contiguous()
    meta = {"embedder": json.dumps(asdict(identity)), "num_docs": str(emb.num_docs),
            "num_chunks": str(emb.num_chunks), "seed": str(emb.seed)}
    header, _ = encode_header([TensorSpec.of("row", row)], meta)
    atomic_write_bytes(path, header + bytes(tensor_bytes(row)))
    return path


def read_row_file(path: str | Path) -> RowFile:
    """Read a router-row file; `CheckpointError` if it is not one."""
    path = Path(path)
    with LazyReader.from_file(path) as r:
        if r.keys() != ["row"] or len(r.spec("row").shape) != 1:
            raise CheckpointError(f"{path}: not a router-row file (expected one 1-d tensor 'row')")
        row = r.get("row").float()
        meta = r.metadata
    try:
        identity = EmbedderIdentity.from_json(json.loads(meta["embedder"]))
        return RowFile(row=row, embedder=identity, num_docs=int(meta["num_docs"]),
                       num_chunks=int(meta["num_chunks"]), seed=int(meta["seed"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: router-row file without valid metadata ({e})") from None


def check_same_embedder(found: EmbedderIdentity, expected: EmbedderIdentity | None, what: str) -> None:
    """Refuse router rows from an embedder other than the anchor's (`ConfigError` naming both)."""
    if expected is None:
        return
    if found.dim != expected.dim:
        raise ConfigError(f"{what} has dimension {found.dim}, but the anchor was built with embedder "
                          f"{expected.name!r} of dimension {expected.dim}; use that embedder")
    if found.sha256 != expected.sha256:
        raise ConfigError(f"{what} ({found.name!r}) differs from the anchor's embedder {expected.name!r} "
                          f"(weights sha256 {found.sha256[:12]} vs {expected.sha256[:12]}); use the anchor's embedder")


@dataclass
class EmbedResult:
    path: Path
    dim: int
    num_docs: int
    num_chunks: int


def embed_domain(cfg, out: Path, *, overwrite: bool, progress: bool) -> EmbedResult:
    """`flexmoe embed-domain` (`cfg` an `EmbedConfig`): the mean embedding of a sample of documents, as a row file."""
    from flexmoe.data import load_documents
    from flexmoe.io.atomic import check_output

    out = check_output(out, overwrite)
    identity = embedder_identity(cfg.embedder)
    docs = load_documents(cfg.data)
    emb = mean_embedding(docs.texts, cfg.embedder, num_docs=cfg.num_docs, seed=cfg.seed, batch_size=cfg.batch_size,
                         max_chunks_per_doc=cfg.max_chunks_per_doc, device=str(cfg.device.torch()),
                         progress=progress)
    write_row_file(out, emb, identity)
    return EmbedResult(path=out, dim=int(emb.row.numel()), num_docs=emb.num_docs, num_chunks=emb.num_chunks)
