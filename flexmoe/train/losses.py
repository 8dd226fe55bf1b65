"""The training losses, in one place: next-token cross-entropy + LM z-loss (chunked for OLMo-2 / FlexOlmo), the
router z-loss, and the public routing loss of router training (`config.RouterTraining`).

Loss = ce + lm_z * mean(lse^2) + router_z * `router_z_loss` + route * `public_route_loss` (no load-balancing loss).

The router terms read the router logits of the last forward, which the routing modules keep in `router_logits`
(`ExpertMoEBlock`, `flexmoe.router.tune.Tunable`): a decoder layer of transformers returns its hidden states only,
so there is no return path from a router to the loss, and `output_router_logits` would collect the same tensors through
forward hooks (a side effect just the same, and it knows nothing of `ExpertMoEBlock`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

from flexmoe.expert.upcycle import ExpertMoEBlock, compute_dtype
from flexmoe.router.tune import Tunable

ROUTERS = (ExpertMoEBlock, Tunable)  # the modules that keep `router_logits` (T, E) of their last forward


def lm_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, z-loss) of logits (B, T, V) against targets (B, T); one logsumexp serves both."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (lse - target_logit).mean(), lse.square().mean()


LOSS_CHUNK_LOGITS = 2**28  # logits per chunk of `ChunkedLMLoss` (1 GiB in fp32): 4 chunks of 2048 tokens at B2 x 4096


# Logits = lm_head(last hidden state), no bias: `CausalLMLoss` runs their LM head inside `ChunkedLMLoss`.
CHUNKED_LOSS_MODELS = (Olmo2ForCausalLM, FlexOlmoForCausalLM)


def loss_chunk(logits: torch.Tensor, targets: torch.Tensor, inv_n: float, z_coef: float, grad: bool):
    """Sums of cross-entropy and of lse^2 over one chunk of logits (n, V) against targets (n,) and, if `grad`,
    the gradient of (ce + z_coef * z) / N w.r.t. these logits, softmax * (1 + 2 z_coef lse) / N - onehot / N,
    in the logits' dtype (what autograd of `lm_losses` would hand the LM head's matmul)."""
    x = logits.float()  # (n, V)
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    target_logit = x.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    ce, z = (lse - target_logit).sum(), lse.square().sum()
    if not grad:
        return None, ce, z
    g = x.sub_(lse[:, None]).exp_().mul_(((1 + 2 * z_coef * lse) * inv_n)[:, None])  # in place: one (n, V) buffer
    g.scatter_add_(-1, targets[:, None], torch.full_like(lse[:, None], -inv_n))
    return g.to(logits.dtype), ce, z


class ChunkedLMLoss(torch.autograd.Function):
    """(ce + z_coef * z, ce, z) of hidden states (N, H) under LM-head weight (V, H) against targets (N,): the same
    numbers as `lm_losses` on `F.linear(hidden, weight)` under autocast, but the (N, V) logits are made a chunk of
    `LOSS_CHUNK_LOGITS` at a time and their gradients w.r.t. hidden and weight (when those need them) are made
    in the same pass, so no logits are kept for backward or recomputed. Matmuls run in `cdt`; the weight's
    gradient is summed in fp32. ce and z are returned detached, for logging."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_coef: float, cdt: torch.dtype, chunk_fn):
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here; out= skips autocast
            h, w = hidden.to(cdt), weight.to(cdt)  # (N, H), (V, H)
            n_tok = h.shape[0]
            size = -(-n_tok // max(1, -(-n_tok * w.shape[0] // LOSS_CHUNK_LOGITS)))  # equal chunks
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            ce = z = None
            for s in range(0, n_tok, size):
                hc = h[s:s + size]  # (n, H)
                g, c, zz = chunk_fn(F.linear(hc, w), targets[s:s + size], 1.0 / n_tok, z_coef, need_h or need_w)
                ce, z = (c, zz) if ce is None else (ce + c, z + zz)
                if need_h:
                    torch.mm(g, w, out=grad_h[s:s + size])
                if need_w:
                    grad_w += g.t().mm(hc)  # (V, H)
            ce, z = ce / n_tok, z / n_tok
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, z)
        return ce + z_coef * z, ce, z

    @staticmethod
    def backward(ctx, d_loss, _d_ce, _d_z):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h.float() * d_loss).to(grad_h.dtype)
        dw = None if grad_w is None else grad_w * d_loss
        return dh, dw, None, None, None, None


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_coef: float,
            chunk_fn=loss_chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce + z_coef * z, ce, z) of hidden (N, H), LM-head weight (V, H), targets (N,) through `ChunkedLMLoss`."""
    return ChunkedLMLoss.apply(hidden, weight, targets, z_coef, compute_dtype(hidden), chunk_fn)


def router_z_loss(model) -> torch.Tensor | None:
    """Layer mean of mean(logsumexp(router_logits)^2) of the last forward, over the `ROUTERS` of `model`
    (an upcycled expert's blocks, or the routers of router tuning); None for a model without them (dense)."""
    terms = [torch.logsumexp(m.router_logits.float(), dim=-1).square().mean()
             for m in model.modules() if isinstance(m, ROUTERS) and m.router_logits is not None]
    return torch.stack(terms).mean() if terms else None


def public_route_loss(model) -> torch.Tensor | None:
    """Layer mean of mean(-log p_public) over the public tokens of the last forward (`RouterTraining.
    public_route_loss`): the router is told outright that public text belongs to the public expert."""
    terms = []
    for m in model.modules():
        if isinstance(m, ExpertMoEBlock) and m.public_tokens and m.router_logits is not None:
            logits = m.router_logits[-m.public_tokens:].float()  # (N_pub, 2)
            terms.append((torch.logsumexp(logits, dim=-1) - logits[:, 0]).mean())
    return torch.stack(terms).mean() if terms else None


class CausalLMLoss(nn.Module):
    """`model` and its training loss as one module, so accelerate's autocast and DDP wrap both:
    forward(inputs (B, T), targets (B, T)) -> (loss, detached cross-entropy).

    Loss = ce + lm_z * z + router_z * `router_z_fn(model)` (when not None) + route * `public_route_loss`. For
    `CHUNKED_LOSS_MODELS` the backbone's last hidden state goes through `lm_loss` with the LM head's weight; other
    models form logits as usual.
    """

    def __init__(self, model, lm_z: float, router_z: float, chunk_fn=loss_chunk, router_z_fn=router_z_loss,
                 route: float = 0.0):
        super().__init__()
        self.model = model
        self.lm_z, self.router_z, self.chunk_fn, self.route = lm_z, router_z, chunk_fn, route
        self.router_z_fn = router_z_fn  # model -> router z-loss of its last forward, or None
        head = model.get_output_embeddings()
        self.chunked = isinstance(model, CHUNKED_LOSS_MODELS) and getattr(head, "bias", None) is None

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chunked:
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
            loss, ce, _ = lm_loss(hidden.flatten(0, 1), self.model.get_output_embeddings().weight,
                                  targets.flatten(), self.lm_z, self.chunk_fn)
        else:
            logits = self.model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            ce, z = lm_losses(logits, targets)
            loss, ce = ce + self.lm_z * z, ce.detach()
        rz = self.router_z_fn(self.model)
        if rz is not None:
            loss = loss + self.router_z * rz
        if self.route:
            loss = loss + self.route * public_route_loss(self.model)
        return loss, ce
