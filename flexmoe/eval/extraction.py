"""Training-data extraction audit: how much of an owner's training text a model reproduces from a prefix.

The measurement (`audit_extraction`; FLEXOLMO.md §5 gives the paper's numbers, docs/privacy.md the details):
1. The documents of `cfg.data` are tokenized with the model's tokenizer (no special tokens). Documents with fewer
   than P + G tokens (P = prefix_len, G = gen_len) are skipped and counted.
2. With `random.Random(seed)`: min(prefixes, qualifying documents) documents are drawn without replacement, and
   in each one token offset o uniform in [0, len - P - G]. One sample per document keeps the samples independent,
   which the confidence intervals assume.
3. The prefix ids[o : o+P] is fed as it is (no BOS/EOS added) and greedily continued by G tokens, in batches:
   flexmoe's fast decoder (flexmoe/infer) for a merged model on CUDA, stock `generate` otherwise. An EOS ends
   the continuation, as in `generate`.
4. Per sample, with gen = the continuation up to its first EOS and true = ids[o+P : o+P+G]:
   lcp = leading tokens of gen equal to true; exact: lcp == G; half: 2 * lcp >= G; lcp fraction lcp / G;
   similarity 1 - levenshtein(gen, true) / G over tokens (the paper counts >= 0.9 as extracted).
5. Each rate over the n samples comes with a 95% Wilson score interval. For the mean LCP fraction (a mean of values
   in [0, 1], not a count) the same formula is used with p(1-p) as the variance, an upper bound on the variance of
   any [0, 1] variable of mean p: the interval is conservative there.

The JSON report names documents by index and offset only; it never holds any of the owner's text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from flexmoe.config import DType, ExtractionConfig, jsonable
from flexmoe.data import load_tokenizer
from flexmoe.errors import CheckpointError, ConfigError, DataError
from flexmoe.eval import bpb as B
from flexmoe.eval.evaluate import versions
from flexmoe.io import hf_config

PAPER_SIMILARITY = 0.9  # normalised Levenshtein similarity that the paper counts as extracted
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Rate:
    """A share of the samples with its Wilson score interval; `count` is a float for the mean LCP fraction."""

    count: float
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, count: float, n: int) -> "Rate":
        low, high = wilson_interval(count, n)
        return cls(count=count, n=n, rate=count / n, low=low, high=high)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n` (Wilson 1927), clipped to [0, 1]."""
    if n < 1:
        raise ValueError(f"a proportion needs n >= 1 samples, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)  # 1.95996... for 95%
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def levenshtein(a: list[int], b: list[int]) -> int:
    """Edit distance (insertions, deletions, substitutions) between two token lists."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@dataclasses.dataclass
class Sample:
    """One prefix: `doc` indexes the non-blank documents of the data in file order, `offset` is in tokens."""

    doc: int
    offset: int
    lcp: int
    similarity: float


@dataclasses.dataclass
class ExtractionResult:
    model: str
    data: list[str]
    requested: int  # cfg.prefixes
    documents: int  # non-blank documents in the data
    skipped_short: int  # documents with fewer than prefix_len + gen_len tokens
    exact: Rate  # continuation == the document's next gen_len tokens
    half: Rate  # longest common prefix >= 50% of gen_len
    lcp: Rate  # mean LCP fraction (conservative interval, see the module docstring)
    paper: Rate  # similarity >= PAPER_SIMILARITY (the paper's criterion, on the greedy continuation)
    samples: list[Sample]
    settings: dict
    versions: dict
    device: str
    fast: bool
    wall_s: float
    json_path: str | None = None

    @property
    def n(self) -> int:
        return len(self.samples)

    def to_json(self) -> dict:
        return {"format": "flexmoe-extraction/1", "model": self.model, "data": self.data, "n": self.n,
                "requested": self.requested, "documents": self.documents, "skipped_short": self.skipped_short,
                "seed": self.settings["seed"], "prefix_len": self.settings["prefix_len"],
                "gen_len": self.settings["gen_len"],
                "exact_match": self.exact.to_json(), "lcp_half": self.half.to_json(),
                "lcp_mean": self.lcp.to_json(), "paper_similarity": self.paper.to_json(),
                "paper_threshold": PAPER_SIMILARITY, "confidence": CONFIDENCE,
                "device": self.device, "fast": self.fast, "settings": self.settings, "versions": self.versions,
                "wall_s": self.wall_s, "samples": [dataclasses.asdict(s) for s in self.samples]}


def sample_prefixes(token_lists: list[list[int]], *, count: int, need: int, seed: int) -> list[tuple[int, int]]:
    """(document index, token offset) pairs, as step 2 of the module docstring draws them."""
    rng = random.Random(seed)
    eligible = [i for i, ids in enumerate(token_lists) if len(ids) >= need]
    chosen = rng.sample(eligible, min(count, len(eligible)))
    return [(i, rng.randrange(len(token_lists[i]) - need + 1)) for i in chosen]


def check_model_dir(path: Path) -> str:
    """The model type of `path`, with the fix for an expert package (which holds only the owner's tensors)."""
    from flexmoe.io.package import PACKAGE_CARD

    if (path / PACKAGE_CARD).is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{path} is an expert package, not a model: merge it with its anchor first "
                          f"(flexmoe merge --anchor ANCHOR --expert {path} --out DIR) and audit DIR")
    return hf_config.model_type(path)


def greedy_continuations(model, prefixes: torch.Tensor, gen_len: int, *, batch_size: int, fast: bool,
                         eos_id: int | list[int] | None, pad_id: int, progress: bool) -> list[list[int]]:
    """The greedy continuation of each row of `prefixes` (N, P), each cut before its first EOS."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    decoder = None
    if fast:
        from flexmoe.infer import enable_fast_path

        decoder = enable_fast_path(model)
    stops = set([eos_id] if isinstance(eos_id, int) else (eos_id or []))
    out: list[list[int]] = []
    for start in tqdm(range(0, len(prefixes), batch_size), desc="extraction", unit="batch", disable=not progress,
                      leave=False):
        ids = prefixes[start: start + batch_size].to(device)  # (b, P): every prefix has P tokens, no padding
        mask = torch.ones_like(ids)
        if decoder is not None:
            seqs = decoder.generate(ids, mask, max_new_tokens=gen_len, eos_token_id=eos_id,
                                    pad_token_id=pad_id).sequences
        else:
            with torch.inference_mode():
                seqs = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, do_sample=False,
                                      eos_token_id=eos_id, pad_token_id=pad_id)
        for row in seqs[:, ids.shape[1]:].tolist():  # (b, <= G)
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def score_samples(token_lists: list[list[int]], picks: list[tuple[int, int]], gens: list[list[int]], *,
                  prefix_len: int, gen_len: int) -> list[Sample]:
    """Step 4 of the module docstring for every (document, offset) pick and its continuation."""
    samples = []
    for (d, o), gen in zip(picks, gens):
        true = token_lists[d][o + prefix_len: o + prefix_len + gen_len]
        samples.append(Sample(doc=d, offset=o, lcp=common_prefix(gen, true),
                              similarity=1.0 - levenshtein(gen, true) / gen_len))
    return samples


def audit_extraction(cfg: ExtractionConfig, out: Path | None, *, overwrite: bool, progress: bool) -> ExtractionResult:
    """Exact-match and softer extraction rates of `cfg.model` on prefixes of `cfg.data` (module docstring); the
    report as JSON at `out` when given."""
    from flexmoe.io.atomic import atomic_write_text, check_output

    if out is not None:
        check_output(out, overwrite)
    t0 = time.perf_counter()
    model_dir = Path(cfg.model)
    kind = check_model_dir(model_dir)  # clear errors for a missing or wrong folder, before any slow work
    need = cfg.prefix_len + cfg.gen_len
    context = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if context is not None and need > context:
        raise ConfigError(f"prefix_len + gen_len = {need} exceeds the model's context of {context} positions: "
                          "lower --prefix-len or --gen-len")
    texts = _read(cfg.data)  # DataError for a missing, empty or unsupported path
    tokenizer = load_tokenizer(model_dir)
    token_lists = B.tokenize(tokenizer, texts)
    picks = sample_prefixes(token_lists, count=cfg.prefixes, need=need, seed=cfg.seed)
    skipped = sum(len(ids) < need for ids in token_lists)
    if not picks:
        longest = max(len(ids) for ids in token_lists)
        raise DataError(f"no document of {', '.join(map(str, cfg.data))} has the {need} tokens a sample needs "
                        f"(longest: {longest}): lower --prefix-len/--gen-len or give longer documents")
    device = cfg.device.torch()
    dtype = (cfg.dtype or (DType.BFLOAT16 if device.type == "cuda" else DType.FLOAT32)).torch
    model = B.load_causal_lm(model_dir, bias=cfg.bias, device=device).to(dtype)
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer has {len(tokenizer)} tokens, the model only "
                              f"{model.config.vocab_size}")
    fast = cfg.fast and hf_config.is_moe(kind) and device.type == "cuda"
    prefixes = torch.tensor([token_lists[d][o: o + cfg.prefix_len] for d, o in picks], dtype=torch.long)  # (N, P)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from flexmoe.infer import deterministic

    with deterministic(cfg.deterministic):
        gens = greedy_continuations(model, prefixes, cfg.gen_len, batch_size=cfg.batch_size, fast=fast, eos_id=eos,
                                    pad_id=pad, progress=progress)
    samples = score_samples(token_lists, picks, gens, prefix_len=cfg.prefix_len, gen_len=cfg.gen_len)
    n, G = len(samples), cfg.gen_len
    settings = {**jsonable(cfg), "json_out": None if out is None else str(out)}
    result = ExtractionResult(
        model=str(cfg.model), data=[str(p) for p in cfg.data], requested=cfg.prefixes, documents=len(texts),
        skipped_short=skipped,
        exact=Rate.of(sum(s.lcp == G for s in samples), n), half=Rate.of(sum(2 * s.lcp >= G for s in samples), n),
        lcp=Rate.of(sum(s.lcp for s in samples) / G, n),
        paper=Rate.of(sum(s.similarity >= PAPER_SIMILARITY for s in samples), n),
        samples=samples, settings=settings, versions=versions(), device=str(device), fast=fast, wall_s=0.0)
    result.wall_s = time.perf_counter() - t0
    if out is not None:
        atomic_write_text(out, json.dumps(result.to_json(), indent=2) + "\n")
        result.json_path = str(out)
    return result


def _read(paths: list[Path]) -> list[str]:
    from flexmoe.data import load_documents

    return load_documents([Path(p) for p in paths]).texts
