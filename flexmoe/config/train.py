"""Configs of the training verbs (train_anchor, init_anchor, embed_domain, train_expert) and of router tuning
and proxy selection (tune_router, select_proxy)."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from flexmoe.config.base import Config, Device, DType, jsonable
from flexmoe.errors import ConfigError


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
