"""Upcycle a dense anchor into the 2-expert model one data owner trains (FLEXOLMO.md §2).

The model is the anchor family's stock MoE class (`FlexOlmoForCausalLM`, `Qwen3MoeForCausalLM`; 2 experts,
top-k = train_top_k, no top-k renormalisation) whose shared tensors are the anchor's, with every layer's `mlp`
replaced by `ExpertMoEBlock`: the same function as the merged checkpoint's MoE layer, but with the public and
owner halves in separate tensors so the public half is frozen with `requires_grad=False` and gets no optimizer
state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.errors import CheckpointError
from flexmoe.io import families, hf_config
from flexmoe.io.anchor import Anchor
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import dense_ffn_key, is_matmul_weight, is_shared, package_bias_key, package_row_key

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAINABLE = ("owner_gate_up", "owner_down", "owner_row", "bias")
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                  "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
                  "attention_bias", "attention_dropout")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in here: autocast's if it is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class SwiGLUFFN(torch.autograd.Function):
    """`down(silu(gate) * up)` with `[gate; up] = gate_up(h)`, every matmul in dtype `cdt`: the same ops, dtypes
    and results as autograd on `F.linear` under autocast, except what is kept for backward: h (only when
    gate_up is trainable) and the (N, 2I) gate/up output. silu(gate) and the (N, I) product are recomputed
    in backward (cheap elementwise work), and the `cdt` copies of the weights are made again there instead of
    being held from forward to backward: per token and layer I (frozen slot) or 2I (trainable slot) fewer
    numbers kept than autograd keeps, and no bf16 copy of a trainable FFN held through the step. Used eagerly;
    under torch.compile the plain ops are traced and the partitioner makes the same choices.

    Inputs: h (N, H); gate_up (2I, H); down (H, I); cdt the compute dtype (`compute_dtype`).
    """

    @staticmethod
    def forward(ctx, h, gate_up, down, cdt):
        hc = h.to(cdt)  # (N, H)
        gu = F.linear(hc, gate_up.to(cdt))  # (N, 2I)
        gate, up = gu.chunk(2, dim=-1)  # (N, I) each
        y = F.linear(F.silu(gate) * up, down.to(cdt))  # (N, H)
        ctx.cdt = cdt
        ctx.save_for_backward(hc if ctx.needs_input_grad[1] else None, gu, gate_up, down)
        return y

    @staticmethod
    def backward(ctx, dy):  # dy (N, H)
        hc, gu, gate_up, down = ctx.saved_tensors
        need_h, need_gu, need_down = ctx.needs_input_grad[:3]
        dy = dy.to(ctx.cdt)
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate)  # (N, I), recomputed
        dW_down = dy.t().mm(act * up) if need_down else None  # (H, I)
        dprod = dy.mm(down.to(ctx.cdt))  # (N, I)
        dgu = torch.empty_like(gu)  # (N, 2I), written in place: no concatenation pass
        dgate, dup = dgu.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(dprod * up, gate, grad_input=dgate)
        torch.mul(dprod, act, out=dup)
        dh = dgu.mm(gate_up.to(ctx.cdt)) if need_h else None  # (N, H)
        dW_gate_up = dgu.t().mm(hc) if need_gu else None  # (2I, H)
        return dh, dW_gate_up, dW_down, None


class ExpertMoEBlock(nn.Module):
    """Identical in function to transformers' `FlexOlmoSparseMoeBlock` with 2 experts, router weight
    [r_pub; r_i] and the expert bias b added to the owner's logit as min(b, 0), except: public and owner
    tensors are separate parameters, both experts run on every token (no host sync; top-1 masks the loser's
    weight to 0), the router logits of the last forward are kept in `router_logits` for the router losses
    (`flexmoe.train.losses`, which says why they are not returned), a SiLU FFN runs through `SwiGLUFFN` (same
    numbers, leaner backward), and the last `public_tokens` tokens of a batch may be public text
    (`RouterTraining`): with `detach_public` the owner FFN's output there is detached, so only the router row
    and bias learn from them.

    Args:
        public_gate_up: (2I, H) the anchor FFN's [gate_proj; up_proj], frozen; the owner's starts as a copy.
        public_down: (H, I) the anchor FFN's down_proj, frozen; the owner's starts as a copy.
        public_row: (H,) r_pub, frozen.
        owner_row: (H,) r_i, trainable.
        top_k: 1 or 2 experts per token; probabilities are not renormalised.
        act: the FFN activation (OLMo-2: silu).
    """

    MATMUL_WEIGHTS = ("public_gate_up", "public_down", "owner_gate_up", "owner_down")  # used only in matmuls

    def __init__(self, *, public_gate_up: torch.Tensor, public_down: torch.Tensor, public_row: torch.Tensor,
                 owner_row: torch.Tensor, top_k: int, act: str = "silu", frozen_dtype: torch.dtype | None = None):
        super().__init__()
        from transformers.activations import ACT2FN

        # The owner's FFN starts as an exact copy; the frozen public FFN may be held in a compute dtype.
        self.public_gate_up = nn.Parameter(public_gate_up.to(frozen_dtype or public_gate_up.dtype, copy=True),
                                           requires_grad=False)
        self.public_down = nn.Parameter(public_down.to(frozen_dtype or public_down.dtype, copy=True),
                                        requires_grad=False)
        self.owner_gate_up = nn.Parameter(public_gate_up.clone())
        self.owner_down = nn.Parameter(public_down.clone())
        self.public_row = nn.Parameter(public_row.clone(), requires_grad=False)
        self.owner_row = nn.Parameter(owner_row.to(public_row.dtype).clone())
        # float32 like the merged sidecar; (1,), not a scalar, because FSDP2 cannot shard 0-d parameters.
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.top_k = top_k
        self.act_fn = ACT2FN[act]
        self.silu = act == "silu"  # OLMo-2's; other activations take the plain autograd path
        self.router_logits: torch.Tensor | None = None
        # Constants per run (Python values, so compiled layers see one setting): see the class docstring.
        self.public_tokens = 0
        self.detach_public = False

    def _ffn(self, h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        # One fused gate/up matmul, chunked like transformers' FlexOlmoExperts so the numbers match.
        if self.silu and not torch.compiler.is_compiling():  # compiled, the partitioner picks what to recompute
            return SwiGLUFFN.apply(h, gate_up, down, compute_dtype(h))  # (N, H)
        gate, up = F.linear(h, gate_up).chunk(2, dim=-1)  # (N, I) each
        return F.linear(self.act_fn(gate) * up, down)  # (N, H)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden_states.shape
        h = hidden_states.reshape(-1, H)  # (N, H)
        logits = F.linear(h, torch.stack((self.public_row, self.owner_row)))  # (N, 2)
        # min(b, 0): the owner may learn to fire less, never more, than its row alone says.
        bias = torch.cat((torch.zeros_like(self.bias), self.bias.clamp(max=0)))  # (2,)
        logits = logits + bias.to(logits.dtype)
        self.router_logits = logits
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, 2), over both experts
        if self.top_k == 1:
            owner_wins = probs[:, 1:] > probs[:, :1]  # (N, 1); a tie goes to the public expert
            probs = torch.cat((probs[:, :1] * ~owner_wins, probs[:, 1:] * owner_wins), dim=-1)
        weights = probs.to(logits.dtype)  # (N, 2), not renormalised
        out = self._ffn(h, self.public_gate_up, self.public_down) * weights[:, :1]
        owner = self._ffn(h, self.owner_gate_up, self.owner_down)  # (N, H)
        if self.public_tokens and self.detach_public:
            # Public tokens: the router still sees what the owner FFN would give (its weight's gradient needs the
            # value), but the FFN gets no gradient from them, so it stays the owner's specialist.
            n = owner.shape[0] - self.public_tokens
            owner = torch.cat((owner[:n], owner[n:].detach()))
        out = out + owner * weights[:, 1:]
        return out.reshape(B, T, H)


def flex_config(olmo2_config, top_k: int):
    """The `FlexOlmoConfig` of a 2-expert model with the anchor's shape."""
    from transformers import FlexOlmoConfig

    fields = {k: getattr(olmo2_config, k) for k in _CONFIG_FIELDS if hasattr(olmo2_config, k)}
    return FlexOlmoConfig(**fields, num_experts=2, num_experts_per_tok=top_k, norm_topk_prob=False,
                          output_router_logits=False, use_cache=False)


def training_config(anchor: Anchor, top_k: int):
    """The 2-expert MoE config of the anchor's family: OLMo-2 → `flex_config`; another family (Qwen3) → its MoE
    config.json translation (`flexmoe.io.families`) with 2 experts. In a pre-norm family (Qwen3) the MoE block,
    and so the router, reads the RMS-normalised residual (post_attention_layernorm's output); in OLMo-2 the raw one."""
    from transformers import AutoConfig, Olmo2Config

    family = hf_config.family(hf_config.read_config(anchor.path))
    if family is families.OLMO2:
        return family, flex_config(Olmo2Config.from_pretrained(anchor.path), top_k)
    cfg = family.moe_config(hf_config.read_config(anchor.path), 2, top_k)
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    cfg.update(output_router_logits=False, use_cache=False)
    return family, AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def anchor_dtype(anchor: Anchor) -> torch.dtype:
    try:
        return DTYPES[anchor.meta.dtype]
    except KeyError:
        raise CheckpointError(f"{anchor.path}: unsupported anchor dtype {anchor.meta.dtype!r}") from None


def expert_skeleton(anchor: Anchor, *, top_k: int = 2, dtype: torch.dtype = torch.float32,
                    frozen_dtype: torch.dtype | None = None):
    """The owner's training model on the meta device: every tensor's name, shape, dtype and `requires_grad`, no
    data. Once its tensors are allocated (`to_empty` on one device, or sharded by FSDP), `fill_expert_` gives it
    the anchor's values, so no process ever holds a second, full CPU copy of the model.

    Args:
        anchor: a loaded anchor (`flexmoe.io.anchor.read_anchor`).
        top_k: experts per token while training (1 or 2).
        dtype: parameter dtype for training.
        frozen_dtype: dtype of the frozen tensors used only as matmul weights (attention projections, LM head,
            public FFN), default `dtype`. bf16 training passes bf16: autocast would cast them at every use anyway,
            and holding them so from the start halves the model's memory.
    """
    import transformers

    held = frozen_dtype or dtype
    family, config = training_config(anchor, top_k)
    hidden, inter = config.hidden_size, config.intermediate_size
    with torch.device("meta"):
        model = getattr(transformers, family.moe_class)(config)
        tied = bool(config.tie_word_embeddings)  # then the LM head is the (looked-up) embedding
        for name, p in model.named_parameters():
            p.data = p.data.to(held if is_matmul_weight(name) and not (tied and name == "lm_head.weight") else dtype)
        for layer in model.model.layers:
            layer.mlp = ExpertMoEBlock(public_gate_up=torch.empty(2 * inter, hidden, dtype=dtype),
                                       public_down=torch.empty(hidden, inter, dtype=dtype),
                                       public_row=torch.empty(hidden, dtype=dtype),
                                       owner_row=torch.empty(hidden, dtype=dtype), top_k=top_k, act=config.hidden_act,
                                       frozen_dtype=held)
    freeze_shared(model)
    return model


@torch.no_grad()
def fill_expert_(model, anchor: Anchor, owner_row: torch.Tensor,
                 put: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> None:
    """Give an `expert_skeleton` whose tensors are allocated its starting values: the shared tensors and both FFN
    halves from the anchor (the owner's an exact copy), r_pub, the owner's row `owner_row` (hidden,) and a zero
    bias, each cast to its parameter's dtype. `put(param, full_value)` stores one full tensor (default `copy_`;
    under FSDP a copy of this process's shard). The anchor is read one tensor at a time.
    """
    put = put or (lambda p, value: p.copy_(value))
    config = model.config
    owner_row = owner_row.reshape(-1).float()
    if owner_row.numel() != config.hidden_size:
        raise CheckpointError(f"router row has {owner_row.numel()} numbers, the anchor's hidden size is {config.hidden_size}")
    tied = bool(config.tie_word_embeddings)
    if tied:
        model.tie_weights()  # `to_empty` gives the LM head and the embedding separate storage
    params = dict(model.named_parameters())
    filled: set[str] = set()

    def fill(name: str, value: torch.Tensor) -> None:
        put(params[name], value)
        filled.add(name)

    # r_pub as the merged router holds it (anchor dtype), so both models compute the same logits.
    public_row = anchor.public_row.to(anchor_dtype(anchor))
    with LazyReader.from_dir(anchor.path) as reader:
        for key in reader.keys():
            if is_shared(key) and not (tied and key == "lm_head.weight"):
                if key not in params:
                    raise CheckpointError(f"{anchor.path}: tensor {key!r} has no place in a {type(model).__name__}")
                fill(key, reader.get(key))
        for i, _ in enumerate(expert_blocks(model)):
            gate, up, down = (reader.get(dense_ffn_key(i, p)) for p in ("gate_proj", "up_proj", "down_proj"))
            gate_up, prefix = torch.cat((gate, up)), f"model.layers.{i}.mlp."
            for half in ("public", "owner"):
                fill(f"{prefix}{half}_gate_up", gate_up)
                fill(f"{prefix}{half}_down", down)
            fill(f"{prefix}public_row", public_row)
            fill(f"{prefix}owner_row", owner_row)
            fill(f"{prefix}bias", torch.zeros(1))
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"{anchor.path}: tensor {missing[0]!r} is missing from the anchor")
    # Non-persistent buffers (RoPE frequencies) have no values after `to_empty`: rebuild them where the model is.
    device = params["model.embed_tokens.weight"].device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)


def upcycle(anchor: Anchor, owner_row: torch.Tensor, *, top_k: int = 2, dtype: torch.dtype = torch.float32,
            frozen_dtype: torch.dtype | None = None):
    """The owner's training model, on CPU, shared tensors frozen (see `freeze_shared`); arguments as
    `expert_skeleton` and `fill_expert_`. Frozen tensors are the anchor's values exactly (in `frozen_dtype`)."""
    model = expert_skeleton(anchor, top_k=top_k, dtype=dtype, frozen_dtype=frozen_dtype)
    model.to_empty(device="cpu")
    fill_expert_(model, anchor, owner_row)
    return model


def expert_blocks(model) -> list[ExpertMoEBlock]:
    blocks = [layer.mlp for layer in model.model.layers]
    if not all(isinstance(b, ExpertMoEBlock) for b in blocks):
        raise CheckpointError("model is not an upcycled expert-training model")
    return blocks


def freeze_shared(model) -> None:
    """Trainable: the owner FFN, r_i and the bias of every layer. Everything else is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad = name.rsplit(".", 1)[-1] in TRAINABLE and ".mlp." in name


def export_package_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Exactly the expert package's tensors (`io.package.package_keys`) on CPU: FFN and row in the anchor's
    `dtype`, the raw bias in float32 (docs/FORMAT.md)."""
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(expert_blocks(model)):
        gate, up = block.owner_gate_up.detach().chunk(2, dim=0)  # (I, H) each
        for proj, t in (("gate_proj", gate), ("up_proj", up), ("down_proj", block.owner_down.detach())):
            out[dense_ffn_key(i, proj)] = t.to("cpu", dtype).contiguous()
        out[package_row_key(i)] = block.owner_row.detach().to("cpu", dtype).contiguous()
        out[package_bias_key(i)] = block.bias.detach().to("cpu", torch.float32).reshape(()).contiguous()
    return out


def load_dense(anchor: Anchor, dtype: torch.dtype = torch.float32):
    """The anchor as its plain dense class (`Olmo2ForCausalLM`, `Qwen3ForCausalLM`), every parameter trainable (the
    no-coordination baseline)."""
    import transformers

    family = hf_config.family(hf_config.read_config(anchor.path))
    return getattr(transformers, family.dense_class).from_pretrained(anchor.path, dtype=dtype)


def export_dense_package_tensors(model, owner_row: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A package from a dense fine-tune: its FFNs as the owner expert, `owner_row` (hidden,) in every layer, bias 0.

    Its shared layers drifted during the fine-tune and are dropped: that is what "no coordination" means.
    """
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[dense_ffn_key(i, proj)] = getattr(layer.mlp, proj).weight.detach().to("cpu", dtype).contiguous()
        out[package_row_key(i)] = owner_row.detach().reshape(-1).to("cpu", dtype).contiguous()
        out[package_bias_key(i)] = torch.zeros((), dtype=torch.float32)
    return out


@torch.no_grad()
def import_package_tensors(model, tensors) -> None:
    """The inverse of `export_package_tensors`: load a package's owner FFN, row and bias into `model`.

    `tensors` maps `package_keys` names to tensors (e.g. `{k: reader.get(k) for k in reader.keys()}`).
    """
    for i, block in enumerate(expert_blocks(model)):
        gate, up, down = (tensors[dense_ffn_key(i, p)] for p in ("gate_proj", "up_proj", "down_proj"))
        block.owner_gate_up.copy_(torch.cat((gate, up)))
        block.owner_down.copy_(down)
        block.owner_row.copy_(tensors[package_row_key(i)].reshape(-1))
        block.bias.copy_(tensors[package_bias_key(i)].reshape(()))


@torch.no_grad()
def project_biases_(model) -> None:
    """Put every expert bias back onto b <= 0 (`BiasUpdate.PROJECT`, after each optimizer step): the forward's
    min(b, 0) then never has a flat side, so the bias stays trainable in both directions."""
    for block in expert_blocks(model):
        block.bias.clamp_(max=0)
