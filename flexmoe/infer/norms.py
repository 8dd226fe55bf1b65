"""RMSNorm as one fused kernel: at batch 1 a decode step is hundreds of tiny kernels, and the stock norm is seven."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoRMSNorm


class FusedRMSNorm(FlexOlmoRMSNorm):
    """Identical to `FlexOlmoRMSNorm` (and OLMo-2's `Olmo2RMSNorm`) except: computed by `F.rms_norm` (fp32 math,
    one rounding at the end, as the stock module does) instead of seven element-wise kernels. Used for decoding
    (`fuse_rms_norms` below) and for eager training (`flexmoe.train.speed.fuse_rms_norms`)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype:  # mixed precision (training under autocast): the stock
            # promotion rules, (weight32 * (x32 * rsqrt(mean(x32^2) + eps))).to(x.dtype), still as one op
            x = hidden_states.float()  # (..., H)
            return F.rms_norm(x, self.weight.shape, self.weight.float(), self.variance_epsilon).to(hidden_states.dtype)
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)

    @classmethod
    def replacing(cls, norm: FlexOlmoRMSNorm) -> "FusedRMSNorm":
        """A fused norm sharing `norm.weight` (the same Parameter object)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.weight = norm.weight
        new.variance_epsilon = norm.variance_epsilon
        return new


def fuse_rms_norms(model) -> int:
    """Swap every stock `FlexOlmoRMSNorm` of `model` for a `FusedRMSNorm` in place; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is FlexOlmoRMSNorm]
    for parent, name, child in swaps:
        setattr(parent, name, FusedRMSNorm.replacing(child))
    return len(swaps)
