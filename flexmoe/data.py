"""Text data: load documents, pack them into fixed-length token blocks, stream blocks in a seeded order.

Inputs: `.jsonl` (one JSON object with a `text` field per line), `.txt` (a whole file is one document),
either optionally gzipped; `.parquet` (a `text` column); a `datasets.save_to_disk` folder; or a folder of any
of these files. `.jsonl` and `.txt` are read with the standard library so training also runs where the
`datasets` package is absent; parquet goes through pyarrow and `save_to_disk` folders through `datasets`.

Packing joins documents with EOS and cuts the stream into blocks of `seq_len` inputs; block i predicts the
tokens shifted by one, so no position is padding and no token is wasted except the tail.

Documents of any length are accepted (a 50 MB `.txt` file, or one 50 MB `.jsonl` line, is one document): the
tokenizer is handed at most `PIECE_CHARS` characters at a time, cut just before a run of whitespace (where a
byte-level BPE splits words anyway, so the tokens are those of the whole text; only a piece without any whitespace
is cut mid-word), and at most `BATCH_CHARS` characters per call, so tokenizing takes bounded memory beyond the text
itself, whatever the document sizes.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from flexmoe.errors import CheckpointError, DataError

TEXT_FIELD = "text"
PIECE_CHARS = 2**18  # the longest text handed to the tokenizer at once (a longer document is cut into pieces)
BATCH_CHARS = 2**22  # characters per tokenizer call, over documents and pieces (bounds its working memory)
_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz", ".parquet")


@dataclass(frozen=True)
class DataSummary:
    """Sizes only: goes into expert cards, so never file names or content."""

    files: int
    documents: int
    bytes: int
    tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Documents:
    texts: list[str]
    files: int

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)

    def summary(self, tokens: int = 0) -> DataSummary:
        return DataSummary(files=self.files, documents=len(self.texts), bytes=self.num_bytes, tokens=tokens)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in _SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{i}: not valid JSON; expected one object with a {TEXT_FIELD!r} field per line") from None
            text = row.get(TEXT_FIELD) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{i}: no string field {TEXT_FIELD!r}")
            yield text


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path, columns=[TEXT_FIELD])
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read a {TEXT_FIELD!r} column ({str(e).splitlines()[0]})") from None
    yield from (t for t in table.column(TEXT_FIELD).to_pylist() if isinstance(t, str))


def _read_saved_dataset(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a save_to_disk folder needs the `datasets` package") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {sorted(ds)}, none called 'train'; pass the split's folder")
        ds = ds["train"]
    if TEXT_FIELD not in ds.column_names:
        raise DataError(f"{path}: dataset has no {TEXT_FIELD!r} column (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns([TEXT_FIELD]).iter(batch_size=1000):
        yield from (t for t in batch[TEXT_FIELD] if isinstance(t, str))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _expand(path: Path) -> list[Path]:
    """The files (or saved-dataset folders) one command-line path stands for."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in _SUFFIXES)
        if not files:
            raise DataError(f"data folder {path} holds no {', '.join(_SUFFIXES)} files and is not a save_to_disk dataset")
        return files
    if _suffix(path) not in _SUFFIXES:
        raise DataError(f"unsupported data file {path}: use {', '.join(_SUFFIXES)} or a save_to_disk folder")
    return [path]


def _read(path: Path) -> Iterator[str]:
    if path.is_dir():
        return _read_saved_dataset(path)
    s = _suffix(path)
    if s in (".jsonl", ".jsonl.gz"):
        return _read_jsonl(path)
    if s == ".parquet":
        return _read_parquet(path)
    with _open_text(path) as f:
        return iter([f.read()])


def load_documents(paths: Sequence[str | Path]) -> Documents:
    """Every non-blank document of `paths`, in the order given. `DataError` if none or a path is bad."""
    if not paths:
        raise DataError("no data given: pass at least one --data PATH")
    files = [f for p in paths for f in _expand(Path(p))]
    texts: list[str] = []
    for f in files:
        try:
            texts.extend(t for t in _read(f) if t.strip())
        except UnicodeDecodeError:
            raise DataError(f"{f}: not UTF-8 text") from None
    if not texts:
        raise DataError(f"no documents found in {', '.join(str(p) for p in paths)}: the data is empty")
    return Documents(texts=texts, files=len(files))


def _cut(text: str, start: int, size: int) -> int:
    """Where the piece of `text` that begins at `start` ends: before the last whitespace run that starts in its
    `size` characters (after its first), else after `size` characters."""
    end = start + size
    i = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
    if i < 0:
        return end
    while i > start + 1 and text[i - 1].isspace():
        i -= 1
    return i


def _pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters (see `_cut`); together exactly `text`."""
    start = 0
    while len(text) - start > size:
        end = _cut(text, start, size)
        yield text[start:end]
        start = end
    yield text[start:]


def tokenize_stream(texts: Sequence[str], tokenizer, *, max_tokens: int | None = None, seed: int = 0,
                    batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Documents in a seeded order, tokenized and joined with EOS, as one int32 stream (n,).

    Stops once `max_tokens` tokens are collected (checked after every `batch_size` documents), so a short run does
    not tokenize a whole corpus; the seeded document order keeps that prefix a fair sample. Each tokenizer call
    gets at most `batch_size` texts and `BATCH_CHARS` characters, a long document in pieces of `PIECE_CHARS`
    (module docstring): the same tokens, in bounded memory.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; documents cannot be separated")
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no length warnings, batch-parallel
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(order), desc="tokenize", unit="doc", disable=not progress, leave=False)
    batch: list[str] = []
    last: list[bool] = []  # whether batch[j] ends its document (EOS follows)
    chars = total = 0

    def flush() -> None:
        nonlocal chars, total
        for enc, end in zip(backend.encode_batch(batch, add_special_tokens=False), last):
            out.append(torch.tensor(enc.ids + [eos] if end else enc.ids, dtype=torch.int32))
            total += out[-1].numel()
        bar.update(sum(last))
        batch.clear()
        last.clear()
        chars = 0

    for start in range(0, len(order), batch_size):
        for i in order[start:start + batch_size]:
            for piece in _pieces(texts[i], PIECE_CHARS):
                if batch and (len(batch) >= batch_size or chars + len(piece) > BATCH_CHARS):
                    flush()
                batch.append(piece)
                last.append(False)
                chars += len(piece)
            last[-1] = True
        if batch:
            flush()
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    return torch.cat(out)


class PackedData:
    """Fixed-length blocks over a token stream, served in a seeded order that restarts identically on resume.

    The block order is an endless sequence: epoch e visits every block once in the permutation seeded by
    (seed, e). `batch(position, count)` returns blocks `position .. position+count-1` of that sequence, so a
    run's data position is one integer and every process can read its own slice.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, *, seed: int = 0):
        self.tokens = tokens  # (n,) int32
        self.seq_len = seq_len
        self.seed = seed
        self.num_blocks = (tokens.numel() - 1) // seq_len
        if self.num_blocks < 1:
            raise DataError(f"the data has {tokens.numel()} tokens, fewer than one sequence of {seq_len + 1}; "
                            "use more data or a smaller --seq-len")
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None
        self._offsets = torch.arange(seq_len + 1)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_blocks, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def block_ids(self, position: int, count: int) -> torch.Tensor:
        ids = []
        for p in range(position, position + count):
            ids.append(int(self._permutation(p // self.num_blocks)[p % self.num_blocks]))
        return torch.tensor(ids)

    def batch(self, position: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (count, seq_len) int64: targets are inputs shifted left by one token."""
        starts = self.block_ids(position, count) * self.seq_len  # (count,)
        window = self.tokens[starts[:, None] + self._offsets].long()  # (count, seq_len + 1)
        return window[:, :-1], window[:, 1:]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.seq_len


def pack(docs: Documents, tokenizer, seq_len: int, *, seed: int = 0, max_tokens: int | None = None,
         progress: bool = True) -> tuple[PackedData, DataSummary]:
    """Tokenize and pack `docs`; the summary counts the tokens actually packed."""
    tokens = tokenize_stream(docs.texts, tokenizer, max_tokens=max_tokens, seed=seed, progress=progress)
    data = PackedData(tokens, seq_len, seed=seed)
    return data, docs.summary(tokens=int(tokens.numel()))


def load_tokenizer(path: str | Path, what: str = "model"):
    """The fast tokenizer saved in a local folder (`what` names the folder in errors: "anchor", "tokenizer", ...).

    Local files only, and it must have an EOS token: documents are joined with it when packed and scored.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{what} {path}: no usable tokenizer ({str(e).splitlines()[0]}); save one into the "
                              "folder with tokenizer.save_pretrained") from None
    if tok.eos_token_id is None:
        raise CheckpointError(f"{what} {path}: the tokenizer has no EOS token")
    if not hasattr(tok, "backend_tokenizer"):
        raise CheckpointError(f"{what} {path}: need a fast (tokenizers-backed) tokenizer")
    return tok
