"""SwitchFFN against a brute-force per-token loop; expert parallelism against one process."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe import SwitchFFN, _ExpertFFN, _padded_experts


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


@pytest.mark.equations
@pytest.mark.parametrize("padding, idle", [(False, 0), (True, 0), (False, 5)])
def test_matches_brute_force(padding, idle):
    torch.manual_seed(0)
    ffn = SwitchFFN(16, 24, 6)
    with torch.no_grad():
        ffn.router.weight.mul_(20)                 # confident, uneven routing
        ffn.router.bias[idle] = -30.0              # this expert (the first, or the last) gets no token
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
    assert ffn.last_counts[idle] == 0              # the zero-token expert path is exercised
    assert ffn.last_counts.sum() == (x.shape[0] * x.shape[1] if mask is None else mask.sum())
    for g, g_ref in zip(grads(ffn, x, y, bal, weight), grads(ffn, x, y_ref, bal_ref, weight)):
        assert torch.allclose(g, g_ref, atol=1e-5), (g - g_ref).abs().max()
    if padding:
        assert (y[~mask] == 0).all()


def test_gpu_expert_path_equals_cpu_path():
    """_padded_experts (what runs on GPUs) against _ExpertFFN (CPUs), run here on the CPU."""
    torch.manual_seed(4)
    E, H, Fd = 5, 8, 12
    counts = torch.tensor([3, 0, 7, 1, 4])                      # expert 1 gets no token
    weights = [torch.randn(E, H, Fd), torch.randn(E, Fd), torch.randn(E, Fd, H), torch.randn(E, H)]
    xs, gy = torch.randn(int(counts.sum()), H), torch.randn(int(counts.sum()), H)
    results = []
    for run in (lambda *a: _ExpertFFN.apply(a[0], counts.tolist(), *a[1:]), lambda *a: _padded_experts(a[0], counts, *a[1:])):
        inputs = [t.clone().requires_grad_() for t in (xs, *weights)]
        y = run(*inputs)
        y.backward(gy)
        results.append([y] + [t.grad for t in inputs])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (results[1][2][1] == 0).all()                      # the idle expert's w1 gradient


@pytest.mark.equations
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


@pytest.mark.equations
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


@pytest.mark.equations
def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(2)
    ffn = SwitchFFN(32, 64, 4)
    x = torch.randn(64, 32)
    y32, _ = ffn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = ffn(x)
    assert y16.dtype == torch.float32           # on CPUs the experts run in float32 under autocast
    assert torch.allclose(y16.float(), y32, atol=3e-2, rtol=3e-2)
    y16.float().sum().backward()
    assert ffn.w1.grad.dtype == torch.float32 and ffn.w1.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_and_experts_run_in_bf16():
    import copy
    torch.manual_seed(3)
    ffn = SwitchFFN(16, 24, 6)
    x = torch.randn(40, 16, requires_grad=True)
    mask = torch.rand(40) < 0.8
    weight = torch.randn(40, 16)
    y, bal = ffn(x, mask)
    ref = grads(ffn, x, y, bal, weight)
    gpu = copy.deepcopy(ffn).cuda()
    xg = x.detach().cuda().requires_grad_()
    yg, balg = gpu(xg, mask.cuda())
    assert torch.allclose(yg.cpu(), y, atol=1e-5) and torch.allclose(balg.cpu(), bal, atol=1e-6)
    for g, g_ref in zip(grads(gpu, xg, yg, balg, weight.cuda()), ref):
        assert torch.allclose(g.cpu(), g_ref, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16, _ = gpu(xg, mask.cuda())
    assert y16.dtype == torch.bfloat16                # on GPUs the experts run in the autocast dtype
    assert torch.allclose(y16.float().cpu(), y, atol=0.05, rtol=0.05)


def test_expert_parameters_are_marked():
    ffn = SwitchFFN(8, 16, 4)
    marked = {n for n, p in ffn.named_parameters() if getattr(p, "expert", False)}
    assert marked == {"w1", "b1", "w2", "b2"}


# ----------------------------------------------------------------------------- expert parallel (gloo, 2 ranks)

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, tmp_path, world: int = 2) -> dict:
    """worker(rank, world, store, results) on `world` gloo processes; {rank: what it put in results}."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()                  # a file store: no port to race for
    mp.spawn(worker, args=(world, str(tmp_path / "store"), results), nprocs=world, join=True)
    return dict(results)


def _sharded_worker(rank: int, world: int, store: str, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = SwitchFFN(16, 24, 6)                       # the same full weights on every rank
        with torch.no_grad():
            full.router.weight.mul_(10)
            full.b1.normal_(), full.b2.normal_()
            full.router.bias[[1, 4]] = -30.0             # experts 1 (rank 0) and 4 (rank 1) get no token
        torch.manual_seed(0)
        shard = SwitchFFN(16, 24, 6, group=dist.group.WORLD)
        lo = rank * 3
        with torch.no_grad():
            shard.router.load_state_dict(full.router.state_dict())
            for name in ("w1", "b1", "w2", "b2"):
                getattr(shard, name).copy_(getattr(full, name)[lo:lo + 3])
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(5 + 9 * rank, 16, generator=g, requires_grad=True)     # uneven token counts
        weight = torch.randn(x.shape, generator=g)
        y, bal = shard(x)
        ((y * weight).sum() + 2.0 * bal).backward()
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref, bal_ref = full(x_ref)
        ((y_ref * weight).sum() + 2.0 * bal_ref).backward()
        router_grad = shard.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        ref_router = full.router.weight.grad.clone()
        dist.all_reduce(ref_router)
        results[rank] = {
            "y": torch.allclose(y, y_ref, atol=1e-5), "bal": torch.allclose(bal, bal_ref, atol=1e-6),
            "x_grad": torch.allclose(x.grad, x_ref.grad, atol=1e-5),
            "router_grad": torch.allclose(router_grad, ref_router, atol=1e-5),
            "counts_zero": bool((shard.last_counts == 0).any()),
            "local_experts": shard.w1.shape[0],
        }
        # expert gradients on their owner equal the one-process gradients over all ranks' tokens
        expert_grads = {n: getattr(full, n).grad.clone() for n in ("w1", "b1", "w2", "b2")}
        for t in expert_grads.values():
            dist.all_reduce(t)
        results[rank]["expert_grads"] = all(
            torch.allclose(getattr(shard, n).grad, expert_grads[n][lo:lo + 3], atol=1e-5) for n in expert_grads)
    finally:
        dist.destroy_process_group()


def test_sharded_layer_equals_one_process(tmp_path):
    results = run_ranks(_sharded_worker, tmp_path, 2)
    for rank in (0, 1):
        r = dict(results[rank])
        assert r.pop("local_experts") == 3 and r.pop("counts_zero")
        assert all(r.values()), (rank, r)


def _bad_world_worker(rank: int, world: int, store: str, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    errors = []
    for hidden, experts in ((8, 5), (8 + 8 * rank, 4)):   # E % W != 0; then different shapes per rank
        try:
            SwitchFFN(hidden, 16, experts, group=dist.group.WORLD)
        except ValueError as e:
            errors.append(str(e))
    try:
        results[rank] = errors
    finally:
        dist.destroy_process_group()


def test_experts_not_divisible_by_world_fail_fast(tmp_path):
    results = run_ranks(_bad_world_worker, tmp_path, 2)
    for r in (0, 1):
        assert "5 experts cannot be split evenly over 2" in results[r][0]
        assert "differs across ranks" in results[r][1]


def _subgroup_worker(rank: int, world: int, store: str, results):
    """4 ranks, two expert groups {0, 1} and {2, 3} holding different experts: the clip norm must come
    from a rank's own group, not from all four ranks."""
    import torch.distributed as dist
    from moe import clip_gradients
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = groups[rank // 2]
        torch.manual_seed(rank // 2)                      # each group its own model
        layer = SwitchFFN(8, 16, 4, group=mine)
        x = torch.randn(6 + rank, 8, generator=torch.Generator().manual_seed(10 + rank))
        y, bal = layer(x)
        (y.pow(2).sum() + bal).backward()
        sq = {n: p.grad.pow(2).sum() for n, p in layer.named_parameters()}
        for n, p in layer.named_parameters():             # the group's true squared norm, brute force
            if getattr(p, "expert", False):
                dist.all_reduce(sq[n], group=mine)
            else:                                          # dense grads: average over the group
                dist.all_reduce(p.grad, group=mine)
                p.grad /= 2
                sq[n] = p.grad.pow(2).sum()
        norm = clip_gradients(layer, 0.0, sharded=True)
        results[rank] = {"norm": norm, "expected": float(sum(sq.values()).sqrt())}
    finally:
        dist.destroy_process_group()


def test_clip_uses_the_layers_expert_group(tmp_path):
    results = run_ranks(_subgroup_worker, tmp_path, 4)
    for rank in range(4):
        r = results[rank]
        assert r["norm"] == pytest.approx(r["expected"], rel=1e-5), (rank, r)
    assert results[0]["norm"] != pytest.approx(results[2]["norm"])   # the groups really differ


def test_layer_borrows_its_process_group_so_destroy_really_ends_it(tmp_path):
    """destroy_process_group must destroy the group (joining gloo's threads) while the interpreter lives:
    a layer, or its autograd graph, that kept a strong reference made rank exit abort now and then."""
    import gc
    import weakref
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ffn = SwitchFFN(8, 16, 4, group=dist.group.WORLD)
        y, bal = ffn(torch.randn(5, 8, requires_grad=True))
        graph_kept = y.sum() + bal                              # a graph through both all-to-alls, kept alive
        graph_kept.backward(retain_graph=True)
        group = weakref.ref(dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    gc.collect()
    assert group() is None, "something still holds the destroyed process group"
    with pytest.raises(RuntimeError, match="process group of this expert-parallel layer was destroyed"):
        ffn(torch.randn(3, 8))


# ----------------------------------------------------------------------------- expert-choice routing

def expert_ffn(ffn: SwitchFFN, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ ffn.w1[e] + ffn.b1[e]) @ ffn.w2[e] + ffn.b2[e]


def expert_choice_loop(ffn: SwitchFFN, x: torch.Tensor, mask=None):
    """Zhou et al. (2022) group by group and expert by expert: each expert ranks the group's real tokens
    by their router probability for it and keeps the best round(c·n/E); a token sums its choosers."""
    E, H = ffn.num_experts, x.shape[-1]
    groups = x.reshape(-1, x.shape[-2], H) if x.dim() > 2 else x.unsqueeze(0)
    real = torch.ones(groups.shape[:2], dtype=torch.bool) if mask is None else mask.reshape(groups.shape[:2])
    out = []
    for g in range(groups.shape[0]):
        ys = [torch.zeros(H) for _ in range(groups.shape[1])]
        tokens = [t for t in range(groups.shape[1]) if real[g, t]]
        probs = {t: torch.softmax(ffn.router(groups[g, t]), -1) for t in tokens}
        k = min(max(math.floor(ffn.capacity_factor * len(tokens) / E + 0.5), 1), len(tokens))
        for e in range(E):
            for t in sorted(tokens, key=lambda t: -float(probs[t][e].detach()))[:k]:
                ys[t] = ys[t] + probs[t][e] * expert_ffn(ffn, e, groups[g, t])
        out.append(torch.stack(ys))
    return torch.stack(out).reshape(x.shape)


def _choice_fixture(E=4, H=16, capacity=1.0, seed=5):
    torch.manual_seed(seed)
    ffn = SwitchFFN(H, 24, E, routing="expert_choice", capacity_factor=capacity)
    with torch.no_grad():
        ffn.router.weight.mul_(10)
        ffn.b1.normal_(), ffn.b2.normal_()
    return ffn


@pytest.mark.equations
@pytest.mark.parametrize("capacity", [1.0, 2.0, 0.5])
def test_expert_choice_matches_loop_forward_and_every_gradient(capacity):
    ffn = _choice_fixture(capacity=capacity)
    x = torch.randn(3, 9, 16, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False                              # groups of 9, 5 and 2 real tokens: k differs per group
    mask[2, 2:] = False
    weight = torch.randn(3, 9, 16)
    y, zero = ffn(x, mask)
    y_ref = expert_choice_loop(ffn, x, mask)
    assert torch.allclose(y, y_ref, atol=1e-5) and zero == 0
    choosers = ffn.last_choosers
    if capacity == 1.0:                              # the cases the issue names are in the fixture
        assert (choosers == 0).any() and (choosers >= 2).any(), choosers
    for g, g_ref in zip(grads(ffn, x, y, zero, weight), grads(ffn, x, y_ref, zero, weight)):
        assert torch.allclose(g, g_ref, atol=1e-5), (g - g_ref).abs().max()
    assert ffn.router.weight.grad.abs().sum() > 0    # the router learns through the gates
    assert (y[~mask] == 0).all()


@pytest.mark.equations
def test_expert_choice_gives_k_tokens_to_every_expert_when_the_router_prefers_one():
    ffn = _choice_fixture(E=4)
    with torch.no_grad():
        ffn.router.weight.mul_(0.05)                 # scores still differ between tokens, without ties
        ffn.router.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))   # every token's favourite is expert 0
    x = torch.randn(24, 16)                          # one group of 24: k = 6
    assert (torch.softmax(ffn.router(x), -1).argmax(-1) == 0).all()
    seen = []
    real_experts = ffn._experts
    ffn._experts = lambda xs, counts: seen.append((xs, counts)) or real_experts(xs, counts)
    y, _ = ffn(x)
    xs, counts = seen[0]
    assert counts.tolist() == [6, 6, 6, 6] and ffn.last_counts.tolist() == [6, 6, 6, 6]
    for e in range(4):                               # 6 distinct tokens of x in expert e's bucket
        bucket = xs[6 * e:6 * (e + 1)]
        rows = {int((x - r).abs().sum(1).argmin()) for r in bucket}
        assert len(rows) == 6
    assert int(ffn.last_choosers.sum()) == 24 and torch.allclose(y, expert_choice_loop(ffn, x), atol=1e-5)


@pytest.mark.equations
def test_expert_choice_with_capacity_e_is_the_soft_mixture():
    E = 4
    ffn = _choice_fixture(E=E, capacity=float(E))    # k = n: every expert takes every token
    x = torch.randn(2, 7, 16)
    y, _ = ffn(x)
    probs = torch.softmax(ffn.router(x), -1)
    soft = sum(probs[..., e:e + 1] * expert_ffn(ffn, e, x) for e in range(E))   # Σ_e S_e·FFN_e(x)
    assert torch.allclose(y, soft, atol=1e-5)
    assert (ffn.last_choosers == E).all()


@pytest.mark.equations
def test_expert_choice_never_chooses_padding_and_groups_are_sequences():
    ffn = _choice_fixture(E=4)
    x = torch.randn(3, 8, 16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 6:] = False
    y, _ = ffn(x, mask)
    junk = x.clone()
    junk[~mask] = 100.0 * ffn.router.weight.sum(0)   # padding that every expert would score highest
    y_junk, _ = ffn(junk, mask)
    assert torch.equal(y[mask], y_junk[mask]) and (y_junk[~mask] == 0).all()
    assert ffn.last_choosers.numel() == int(mask.sum())
    # the evaluation rule: a sentence's output depends neither on its batch mates nor on the batch size
    for b in range(3):
        n = int(mask[b].sum())
        alone, _ = ffn(x[b:b + 1, :n])
        assert torch.allclose(alone[0], y[b, :n], atol=1e-6)
    reordered, _ = ffn(x[[2, 0, 1]], mask[[2, 0, 1]])
    assert torch.allclose(reordered, y[[2, 0, 1]], atol=1e-6)


def test_expert_choice_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown routing"):
        SwitchFFN(8, 16, 4, routing="top2")
    for c in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity factor"):
            SwitchFFN(8, 16, 4, routing="expert_choice", capacity_factor=c)


@pytest.mark.equations
def test_expert_choice_bf16_autocast_close_to_fp32():
    ffn = _choice_fixture(E=4, H=32)
    x = torch.randn(4, 16, 32)
    y32, _ = ffn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = ffn(x)
    agree = (y16.float() - y32).abs().amax(-1) < 0.1   # bf16 router scores may swap a near-tied choice
    assert agree.float().mean() > 0.9


# ----------------------------------------------------------------------------- mutual distillation (MoDE)

def mutual_distillation_loop(ffn: SwitchFFN, tokens: torch.Tensor) -> torch.Tensor:
    """1 / (T·E·(E−1)) · Σ_t Σ_{i≠j} ‖E_i(x_t) − E_j(x_t)‖², pair by pair."""
    E, total = ffn.num_experts, 0.0
    for i in range(E):
        for j in range(E):
            if i != j:
                total = total + (expert_ffn(ffn, i, tokens) - expert_ffn(ffn, j, tokens)).pow(2).sum()
    return total / (tokens.shape[0] * E * (E - 1))


@pytest.mark.equations
def test_mutual_distillation_matches_pair_loop_and_its_gradients():
    ffn = _choice_fixture(E=5)
    ffn.routing = "top1"
    tokens = torch.randn(13, 16)
    loss = ffn.mutual_distillation_loss(tokens)
    ref = mutual_distillation_loop(ffn, tokens)
    assert torch.allclose(loss, ref, rtol=1e-5)
    got = torch.autograd.grad(loss, [ffn.w1, ffn.b1, ffn.w2, ffn.b2])
    want = torch.autograd.grad(ref, [ffn.w1, ffn.b1, ffn.w2, ffn.b2])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)
    for g in got:                                    # every expert is pulled
        assert (g.flatten(1).abs().sum(1) > 0).all()
    ffn.zero_grad()
    ffn.mutual_distillation_loss(tokens.requires_grad_()).backward()
    assert ffn.router.weight.grad is None and tokens.grad is None    # not the router, not the trunk


@pytest.mark.equations
def test_mutual_distillation_is_zero_for_equal_experts_and_grows_with_their_spread():
    ffn = SwitchFFN(8, 16, 4)
    with torch.no_grad():
        for w in (ffn.w1, ffn.b1, ffn.w2, ffn.b2):
            w.copy_(w[1:2].expand_as(w) if w.dim() == 3 else torch.randn(w.shape[1]).expand_as(w))
    tokens = torch.randn(10, 8)
    assert ffn.mutual_distillation_loss(tokens) == 0
    with torch.no_grad():
        ffn.b2[2] += 1.0                             # one expert moved by a unit vector per coordinate
    # pairs involving expert 2: 2·(E−1) ordered pairs, each ‖1‖² = H, over E·(E−1) pairs
    assert ffn.mutual_distillation_loss(tokens).item() == pytest.approx(2 * 3 * 8 / (4 * 3), rel=1e-5)


# ----------------------------------------------------------------------------- both options over 2 gloo ranks

def _options_worker(rank: int, world: int, store: str, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = _choice_fixture(E=6)
        torch.manual_seed(0)
        shard = SwitchFFN(16, 24, 6, group=dist.group.WORLD, routing="expert_choice")
        lo = rank * 3
        with torch.no_grad():
            shard.router.load_state_dict(full.router.state_dict())
            for name in ("w1", "b1", "w2", "b2"):
                getattr(shard, name).copy_(getattr(full, name)[lo:lo + 3])
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(2 + rank, 10, 16, generator=g, requires_grad=True)     # uneven batches
        mask = torch.rand(x.shape[:2], generator=g) < 0.7
        weight = torch.randn(x.shape, generator=g)
        y, _ = shard(x, mask)
        (y * weight).sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref, _ = full(x_ref, mask)
        (y_ref * weight).sum().backward()
        r = {"y": torch.allclose(y, y_ref, atol=1e-5), "x_grad": torch.allclose(x.grad, x_ref.grad, atol=1e-5)}
        ref = {n: getattr(full, n).grad.clone() for n in ("w1", "b1", "w2", "b2")}
        for t in ref.values():
            dist.all_reduce(t)
        r["expert_grads"] = all(torch.allclose(getattr(shard, n).grad, ref[n][lo:lo + 3], atol=1e-5) for n in ref)
        # MoDE: each rank its own tokens; the one-process loss is over both ranks' tokens
        shard.zero_grad(), full.zero_grad()
        tokens = [torch.randn(4 + 3 * s, 16, generator=torch.Generator().manual_seed(7 + s)) for s in range(world)]
        loss = shard.mutual_distillation_loss(tokens[rank])
        loss.backward()
        loss_ref = mutual_distillation_loop(full, torch.cat(tokens))
        loss_ref.backward()
        r["mode_loss"] = torch.allclose(loss, loss_ref, rtol=1e-5)
        r["mode_grads"] = all(torch.allclose(getattr(shard, n).grad / world, getattr(full, n).grad[lo:lo + 3],
                                             atol=1e-6, rtol=1e-4) for n in ("w1", "b1", "w2", "b2"))
        results[rank] = r
    finally:
        dist.destroy_process_group()


def test_expert_choice_and_mutual_distillation_over_two_ranks_equal_one_process(tmp_path):
    results = run_ranks(_options_worker, tmp_path, 2)
    for rank in (0, 1):
        assert all(results[rank].values()), (rank, dict(results[rank]))
