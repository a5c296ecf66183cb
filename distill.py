"""Transfer capability distillation losses (paper Section 2.3, Eq. 6-11) and the teacher wrapper.

    rel = relation(h)                    # cosine similarities of rows of h, Eq. 6/7: [..., N, N]
    rel = relation(q, k)                 # queries against keys, Eq. 9/10: [..., N, M]
    loss = relation_loss(rel_student, rel_teacher)               # Eq. 8 (Eq. 11: attention_loss)
    index = sample_groups(attention_mask, tokens=4096, group=128, generator=g)  # (32, 128)
    parts = tcd_losses(student_taps, teacher_taps, index, attention_mask)  # trunk, inner, attention

The student and the teacher are compared through *relations* between token representations,
never the representations themselves, so their hidden sizes may differ.

Shapes: B batch, T sequence length, D a representation's size (student and teacher may differ),
nh heads, hs head size; G groups of n sampled tokens (the paper's N in Eq. 6-8: 32 groups of 128). Copy this file alone
into another project: it imports only torch (model.py only inside `Teacher.load`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def relation(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of every row of a with every row of b (a itself when b is None).
    a: [..., N, D], b: [..., M, D] -> [..., N, M]. Computed in float32."""
    with torch.autocast(a.device.type, enabled=False):          # autocast would cast the matmul down
        a = F.normalize(a.float(), dim=-1)
        b = a if b is None else F.normalize(b.float(), dim=-1)
        return a @ b.transpose(-1, -2)                           # Eq. 6/7, Eq. 9/10


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over all pairs (and groups) of the squared difference of two relation matrices."""
    return (student - teacher.detach()).pow(2).mean()            # Eq. 8: (1/N²) Σ_ij MSE(s_ij, s'_ij)


def sample_groups(attention_mask: torch.Tensor, tokens: int, group: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random non-padding positions of a (B, T) batch, as flat indices [n_groups, group_size]:
    `tokens` of them (all, when fewer), in groups of `group` (one smaller group when fewer
    than `group` exist). The same index serves the teacher and the student at every tap."""
    real = attention_mask.bool().cpu().reshape(-1).nonzero().squeeze(1)
    picked = real[torch.randperm(real.numel(), generator=generator)[:tokens]]
    size = min(group, picked.numel())
    return picked[: picked.numel() // size * size].view(-1, size)


def _pairwise_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Sum over taps of Eq. 8 on the sampled groups (each tap averaged over its groups)."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        s, t = s.reshape(-1, s.shape[-1])[index], t.reshape(-1, t.shape[-1])[index]  # (G, n, D)
        total = total + relation_loss(relation(s), relation(t))
    return total


def attention_loss(q: torch.Tensor, k: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 9-11 for one layer: query-key relations per head and sequence, averaged over heads
    and sequences; pairs with a padding query or key are left out. q, k: (B, nh, T, hs)."""
    diff = (relation(q, k) - relation(q_t, k_t).detach()).pow(2)  # (B, nh, T, T)
    if attention_mask is None:
        return diff.mean()
    real = attention_mask.bool().to(diff.device)
    pairs = (real[:, :, None] & real[:, None, :]).unsqueeze(1)   # (B, 1, T, T)
    per_seq = (diff * pairs).sum((-1, -2)) / pairs.sum((-1, -2)).clamp_min(1)  # Eq. 11: (B, nh)
    return per_seq.mean()


def tcd_losses(student: dict, teacher: dict, index: torch.Tensor, attention_mask: torch.Tensor | None = None,
               attention: bool = True) -> dict[str, torch.Tensor]:
    """L_T, L_I and L_A of Eq. 13 from the taps of model.BertModel (taps=True)."""
    index = index.to(student["trunk"][0].device)
    out = {"trunk": _pairwise_loss(student["trunk"], teacher["trunk"], index),
           "inner": _pairwise_loss(student["inner"], teacher["inner"], index)}
    out["attention"] = student["trunk"][0].new_zeros((), dtype=torch.float32)
    if attention:
        for q, k, q_t, k_t in zip(student["q"], student["k"], teacher["q"], teacher["k"]):
            out["attention"] = out["attention"] + attention_loss(q, k, q_t, k_t, attention_mask)
    return out


class Teacher(nn.Module):
    """A frozen, eval-mode encoder (e.g. model.BertModel) that only ever produces taps."""

    def __init__(self, encoder: nn.Module, vocab: list[str] | None = None, bf16: bool = False):
        super().__init__()
        self.encoder, self.vocab, self.bf16 = encoder.eval().requires_grad_(False), vocab, bf16

    @classmethod
    def load(cls, path, bf16: bool = False) -> "Teacher":
        from checkpoint import load_checkpoint
        mlm, ckpt = load_checkpoint(path)
        return cls(mlm.bert, ckpt.get("vocab"), bf16)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)                              # dropout stays off

    def check_student(self, config, vocab: list[str] | None, attention: bool) -> None:
        """Raise ValueError naming what differs when this teacher cannot teach that student."""
        mine, problems = self.encoder.config, []
        if vocab is not None and self.vocab is not None and vocab != self.vocab:
            problems.append(f"vocabularies differ ({len(self.vocab)} vs {len(vocab)} tokens)")
        if mine.num_layers != config.num_layers:
            problems.append(f"layers differ (teacher {mine.num_layers}, student {config.num_layers})")
        if attention and mine.num_heads != config.num_heads:
            problems.append(f"heads differ (teacher {mine.num_heads}, student {config.num_heads}); "
                            "the attention relation (lambda_A > 0) needs equal head counts")
        if problems:
            raise ValueError("teacher does not fit the student: " + "; ".join(problems))

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> dict:
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.encoder(input_ids, attention_mask, token_type_ids, taps=True).taps
