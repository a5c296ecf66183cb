"""distill.py against naive double loops over Eq. 6-11."""
import math

import pytest
import torch

from distill import Teacher, attention_loss, relation, relation_loss, sample_groups, tcd_losses
from model import BertConfig, BertForMaskedLM


def cos(u, v):
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def naive_loss(hs, ht):                          # Eq. 6-8 by the letter
    n = len(hs)
    return sum((cos(hs[i], hs[j]) - cos(ht[i], ht[j])) ** 2 for i in range(n) for j in range(n)) / n**2


@pytest.mark.equations
def test_relation_and_loss_match_double_loop():
    torch.manual_seed(0)
    hs, ht = torch.randn(7, 5), torch.randn(7, 9)              # hidden sizes may differ
    r = relation(hs)
    for i in range(7):
        for j in range(7):
            assert abs(r[i, j] - cos(hs[i], hs[j])) < 1e-6
    assert abs(relation_loss(relation(hs), relation(ht)) - naive_loss(hs, ht)) < 1e-6
    q, k = torch.randn(4, 6), torch.randn(5, 6)
    rq = relation(q, k)                                          # Eq. 9: queries x keys
    assert rq.shape == (4, 5)
    assert all(abs(rq[i, j] - cos(q[i], k[j])) < 1e-6 for i in range(4) for j in range(5))


@pytest.mark.equations
def test_relations_stay_float32_under_bf16_autocast():
    torch.manual_seed(5)
    hs, ht = torch.randn(2, 64, 32), torch.randn(2, 64, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, loss = relation(hs), relation_loss(relation(hs), relation(ht))
    assert r.dtype == torch.float32
    assert torch.allclose(r, relation(hs), atol=1e-6)                 # a bf16 matmul is off by ~1e-3
    assert abs(float(loss) - float(relation_loss(relation(hs), relation(ht)))) < 1e-6


@pytest.mark.equations
def test_attention_loss_matches_double_loop_and_skips_padding():
    torch.manual_seed(1)
    B, nh, T, hs = 3, 3, 5, 4
    q, k, qt, kt = (torch.randn(B, nh, T, hs) for _ in range(4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])   # a sequence of one real token too
    expected = 0.0
    for b in range(B):
        n = int(mask[b].sum())
        for h in range(nh):                                     # Eq. 11 per head and sequence
            expected += sum((cos(q[b, h, i], k[b, h, j]) - cos(qt[b, h, i], kt[b, h, j])) ** 2
                            for i in range(n) for j in range(n)) / n**2
    expected /= B * nh
    assert abs(attention_loss(q, k, qt, kt, mask) - expected) < 1e-6
    junk = q.clone()
    junk[1, :, 3:] = 50.0                                       # padding queries do not count
    assert abs(attention_loss(junk, k, qt, kt, mask) - expected) < 1e-6


@pytest.mark.equations
def test_sample_groups_never_hits_padding():
    mask = torch.zeros(6, 40, dtype=torch.bool)
    for b, n in enumerate([40, 3, 17, 0, 25, 9]):
        mask[b, :n] = True
    g = torch.Generator().manual_seed(0)
    idx = sample_groups(mask, tokens=64, group=16, generator=g)
    assert idx.shape == (4, 16)
    assert mask.reshape(-1)[idx].all() and idx.unique().numel() == 64
    few = sample_groups(mask[1:2], tokens=64, group=16, generator=g)   # only 3 real tokens: one group of 3
    assert few.shape == (1, 3) and mask[1:2].reshape(-1)[few].all()
    many = sample_groups(mask, tokens=1000, group=16, generator=g)     # all 94 real: 5 full groups
    assert many.shape == (5, 16)
    again = [sample_groups(mask, 64, 16, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], again[2])   # the generator decides


def tiny(seed, **kw):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig.preset("tiny", num_layers=2, vocab_size=80, **kw))


@pytest.mark.equations
def test_identical_teacher_gives_zero_and_gradients_reach_only_student():
    student = tiny(0, num_experts=0, dropout=0.0, attention_dropout=0.0)
    teacher = Teacher(tiny(0).bert)
    ids, mask = torch.randint(1, 80, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    mask[2, 7:] = 0
    idx = sample_groups(mask, 32, 8, torch.Generator().manual_seed(0))
    same = tcd_losses(student.bert(ids, mask, taps=True).taps, teacher(ids, mask), idx, mask)
    assert all(v.abs() < 1e-6 for v in same.values())
    moe = tiny(1, num_experts=4)
    parts = tcd_losses(moe.bert(ids, mask, taps=True).taps, teacher(ids, mask), idx, mask)
    assert all(v > 0 for v in parts.values())
    sum(parts.values()).backward()
    assert moe.bert.layers[0].qkv.weight.grad.abs().sum() > 0
    assert moe.bert.layers[1].ffn.w1.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.encoder.training                        # stays in eval mode


@pytest.mark.equations
def test_tcd_losses_sum_eq8_over_taps_and_average_over_groups():
    torch.manual_seed(2)
    B, T = 2, 6
    student = {"trunk": [torch.randn(B, T, 5) for _ in range(4)], "inner": [torch.randn(B, T, 5) for _ in range(4)]}
    teacher = {"trunk": [torch.randn(B, T, 3) for _ in range(4)], "inner": [torch.randn(B, T, 3) for _ in range(4)]}
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    index = sample_groups(mask, tokens=8, group=4, generator=torch.Generator().manual_seed(0))  # (2, 4)
    parts = tcd_losses(student, teacher, index, mask, attention=False)
    for site in ("trunk", "inner"):
        expected = 0.0
        for s, t in zip(student[site], teacher[site]):           # L_T / L_I: sum over the 2L taps
            groups = [(s.reshape(-1, 5)[g], t.reshape(-1, 3)[g]) for g in index]  # same tokens for both
            expected += sum(naive_loss(hs, ht) for hs, ht in groups) / len(groups)
        assert abs(float(parts[site]) - expected) < 1e-5
    assert float(parts["attention"]) == 0.0


def test_teacher_check_student():
    teacher = Teacher(tiny(0).bert, vocab=["a", "b"])
    teacher.check_student(BertConfig.preset("tiny", num_layers=2, hidden_size=64, num_heads=2), ["a", "b"], True)
    with pytest.raises(ValueError, match="layers differ"):
        teacher.check_student(BertConfig.preset("tiny", num_layers=3), ["a", "b"], False)
    with pytest.raises(ValueError, match="vocabularies differ"):
        teacher.check_student(BertConfig.preset("tiny", num_layers=2), ["a", "c"], False)
    with pytest.raises(ValueError, match="heads differ"):
        teacher.check_student(BertConfig.preset("tiny", num_layers=2, num_heads=4), None, True)
    teacher.check_student(BertConfig.preset("tiny", num_layers=2, num_heads=4), None, False)



@pytest.mark.equations
def test_tcd_losses_pass_the_padding_mask_to_the_attention_relation():
    """L_A of tcd_losses is Eq. 11 summed over layers with the padding mask applied."""
    torch.manual_seed(3)
    B, nh, T, hs, layers = 2, 2, 6, 4, 3
    taps = lambda D: {"trunk": [torch.randn(B, T, D) for _ in range(2 * layers)],
                      "inner": [torch.randn(B, T, D) for _ in range(2 * layers)],
                      "q": [torch.randn(B, nh, T, hs) for _ in range(layers)],
                      "k": [torch.randn(B, nh, T, hs) for _ in range(layers)]}
    student, teacher = taps(5), taps(3)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 2:] = 0
    index = sample_groups(mask, tokens=8, group=4, generator=torch.Generator().manual_seed(0))
    parts = tcd_losses(student, teacher, index, mask)
    expected = sum(attention_loss(q, k, qt, kt, mask) for q, k, qt, kt in
                   zip(student["q"], student["k"], teacher["q"], teacher["k"]))
    unmasked = sum(attention_loss(q, k, qt, kt, None) for q, k, qt, kt in
                   zip(student["q"], student["k"], teacher["q"], teacher["k"]))
    assert float(parts["attention"]) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(expected) - float(unmasked)) > 1e-3
