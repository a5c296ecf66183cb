"""SwitchFFN against a brute-force per-token loop; expert parallelism against one process."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe import SwitchFFN


def brute_force(ffn: SwitchFFN, x: torch.Tensor, mask=None):
    """Eq. 1-5 token by token, straight from the paper."""
    H = x.shape[-1]
    flat = x.reshape(-1, H)
    keep = torch.ones(flat.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    ys, probs = [], []
    for t in range(flat.shape[0]):
        if not keep[t]:
            ys.append(torch.zeros(H))
            continue
        p = torch.softmax(ffn.router(flat[t]), -1)                # Eq. 1
        i = int(torch.argmax(p))                                  # Eq. 2
        e = F.gelu(flat[t] @ ffn.w1[i] + ffn.b1[i]) @ ffn.w2[i] + ffn.b2[i]
        ys.append(p[i] * e)                                       # Eq. 3
        probs.append(p)
    q = torch.stack(probs).mean(0)                                # Eq. 4
    u = torch.full_like(q, 1 / q.numel())
    balance = (u * (u / q).log()).sum()                           # Eq. 5: KL(u || q)
    return torch.stack(ys).reshape(x.shape), balance


def grads(ffn, x, out, balance, weight):
    ffn.zero_grad()
    x.grad = None
    ((out * weight).sum() + 3.0 * balance).backward()
    return [x.grad.clone()] + [p.grad.clone() for p in ffn.parameters()]


@pytest.mark.parametrize("padding", [False, True])
def test_matches_brute_force(padding):
    torch.manual_seed(0)
    ffn = SwitchFFN(16, 24, 6)
    with torch.no_grad():
        ffn.router.weight.mul_(20)                 # confident, uneven routing
        ffn.router.bias[0] = -30.0                 # expert 0 gets no token
        ffn.b1.normal_(), ffn.b2.normal_()
    x = torch.randn(3, 11, 16, requires_grad=True)
    mask = None
    if padding:
        mask = torch.ones(3, 11, dtype=torch.bool)
        mask[1, 6:] = False
        mask[2, 2:] = False
    weight = torch.randn(3, 11, 16)
    y, bal = ffn(x, mask)
    y_ref, bal_ref = brute_force(ffn, x, mask)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(bal, bal_ref, atol=1e-6)
    assert (ffn.last_counts == 0).any()           # the zero-token expert path is exercised
    assert ffn.last_counts.sum() == (x.shape[0] * x.shape[1] if mask is None else mask.sum())
    for g, g_ref in zip(grads(ffn, x, y, bal, weight), grads(ffn, x, y_ref, bal_ref, weight)):
        assert torch.allclose(g, g_ref, atol=1e-5), (g - g_ref).abs().max()
    if padding:
        assert (y[~mask] == 0).all()


def test_padding_changes_nothing_for_real_tokens():
    torch.manual_seed(1)
    ffn = SwitchFFN(8, 16, 4)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y, bal = ffn(x, mask)
    junk = x.clone()
    junk[~mask] = 100.0                          # whatever sits at padding must not matter
    y2, bal2 = ffn(junk, mask)
    assert torch.equal(y[mask], y2[mask]) and torch.equal(bal, bal2)
    _, bal_real = ffn(x[mask])                   # Eq. 4 over real tokens only
    assert torch.allclose(bal, bal_real)


def test_balance_loss_closed_form():
    ffn = SwitchFFN(8, 16, 4)
    with torch.no_grad():
        ffn.router.weight.zero_()
        ffn.router.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    _, bal = ffn(torch.randn(10, 8))
    q = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0)
    assert torch.allclose(bal, -math.log(4) - q.log().mean())
    with torch.no_grad():
        ffn.router.bias.zero_()
    assert ffn(torch.randn(10, 8))[1].abs() < 1e-7      # uniform router: no penalty


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(2)
    ffn = SwitchFFN(32, 64, 4)
    x = torch.randn(64, 32)
    y32, _ = ffn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = ffn(x)
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, atol=3e-2, rtol=3e-2)
    y16.float().sum().backward()
    assert ffn.w1.grad.dtype == torch.float32 and ffn.w1.grad.abs().sum() > 0


def test_expert_parameters_are_marked():
    ffn = SwitchFFN(8, 16, 4)
    marked = {n for n, p in ffn.named_parameters() if getattr(p, "expert", False)}
    assert marked == {"w1", "b1", "w2", "b2"}
