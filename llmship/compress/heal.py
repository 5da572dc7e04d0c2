"""Healing a pruned model by knowledge distillation against the FP32 original, on the CPU.

The loss at every position is (1 - ce_weight) * KL(teacher || student) + ce_weight * cross-entropy of the next
calibration token: mostly the teacher's whole distribution, a little of the text. AdamW (no weight decay), a
linear warm-up over the first 10% of the steps, cosine decay to zero, gradients clipped at norm 1. Batches are
drawn by a seeded generator and the run uses a fixed thread count, so the same inputs give the same student on
the same machine (validation rebuilds it and checks its digest).
"""
from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from llmship.compress.prune import run_sequences
from llmship.progress import bar

THREADS = 2  # summation order depends on the thread count: fixed, so a rebuild gives the same student


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                      ce_weight: float) -> torch.Tensor:
    """Mean over positions of (1 - w) KL(teacher || student) + w CE(next token); logits [B, T, V], tokens [B, T]."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    ce = F.nll_loss(s[:, :-1].reshape(-1, s.shape[-1]), tokens[:, 1:].reshape(-1))
    return (1 - ce_weight) * kl + ce_weight * ce


def heal(student, teacher, sequences: list[list[int]], settings, seed: int) -> dict:
    """Train `student` (a MobileDecoder; its parameters change in place) towards `teacher` for settings.steps steps;
    returns {"loss": per-step loss, "seconds", "seconds_per_step"}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _train(student, teacher, torch.tensor(sequences, dtype=torch.int64), settings, seed)
    finally:
        torch.set_num_threads(threads)


def _train(student, teacher, tokens: torch.Tensor, settings, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warmup = max(1, settings.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses = []
    start = time.perf_counter()
    student.train()
    try:
        for _ in bar(range(settings.steps), "healing", settings.steps, unit="step"):
            batch = tokens[torch.randint(len(tokens), (min(settings.batch, len(tokens)),), generator=gen)]
            with torch.no_grad():
                target = run_sequences(teacher, batch)
            loss = distillation_loss(run_sequences(student, batch), target, batch, settings.ce_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        student.eval()
        for p in params:
            p.requires_grad_(False)
    seconds = time.perf_counter() - start
    return {"loss": losses, "seconds": seconds, "seconds_per_step": seconds / max(1, settings.steps)}
