"""The one place where this toolkit works around a library: TRL's loss kernel on machines without Triton.

TRL 1.15's SFTTrainer always computes the loss through a fused LM head whose per-token log-probabilities come from a
Triton kernel (`trl.kernels.ChunkedLogProbFunction`). Triton ships with CUDA builds of PyTorch only, so on a CPU the
trainer fails at its first step. Here the same function is written in plain PyTorch (full logits: fine for the small
models a CPU trains) and put where TRL looks for the kernel, only when the kernel could not be imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchChunkedLogProb:
    """Same signature and outputs as TRL's `ChunkedLogProbFunction.apply`; autograd does the backward."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        logits = F.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        log_probs_all = logits.log_softmax(-1)
        log_probs = log_probs_all.gather(-1, targets[:, None]).squeeze(-1)
        probs = log_probs_all.exp()
        entropy = -(probs * log_probs_all).sum(-1) if "entropy" in outputs else None
        log_sum_sq = torch.logsumexp(2 * log_probs_all, -1) if "log_sum_sq_probs" in outputs else None
        mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
        is_top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def patch_trl_without_triton() -> bool:
    """Install the PyTorch stand-in if TRL found no Triton kernel; returns whether it did."""
    from trl.trainer import utils

    if utils._ChunkedLogProbFunction is not None:
        return False
    utils._ChunkedLogProbFunction = TorchChunkedLogProb
    return True
