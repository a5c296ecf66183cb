"""Top-1 Switch mixture-of-experts FFN (paper Eq. 1-5), dropless, optionally expert-parallel,
with expert-choice routing and mutual distillation among experts as options.

    ffn = SwitchFFN(hidden_size=128, intermediate_size=512, num_experts=64)
    y, balance_loss = ffn(x)                  # x: [..., H]; y like x
    ffn = SwitchFFN(128, 512, 64, routing="expert_choice", capacity_factor=1.0)
    y, zero = ffn(x, mask)                    # each expert takes its k best tokens of each sequence
    loss = ffn.mutual_distillation_loss(tokens)   # MoDE, our reading: tokens (T, H)

The forward follows Tutel's hello-world: softmax router -> top-1 -> sort tokens by expert ->
(all-to-all) -> batched experts -> (all-to-all back) -> unsort -> scale by the gate.
With `group=None` everything is local. With a process group of size W, rank r holds experts
r*E/W ... (r+1)*E/W - 1 and tokens travel to their expert's rank by `all_to_all_single`
(NCCL on GPUs, gloo on CPUs; gradients flow back through both exchanges). Expert parameters
carry `param.expert = True`; the helpers at the end (sync_gradients, clip_gradients) use it
to keep experts out of the data-parallel all-reduce and to clip over every rank's experts
(checkpoint.py writes each rank's experts to its own file). No token is ever dropped, whatever
the load: every expert runs on exactly the tokens routed to it, as one `addmm` per expert into
preallocated buffers (`_ExpertFFN`).

Shapes: N tokens in a batch (padding included), M real tokens (the paper's M, Eq. 4), H hidden
size, F expert FFN size, E experts (the paper's N in Eq. 3), E_local = E / W experts per rank.
The paper's layer (SwitchFFN) comes first; the token permutations, the per-expert matmuls and the
all-to-all it calls come after it, then the helpers for training with sharded experts.

Two routing rules share one dispatch/combine contract (flaxformer's habit): a rule picks
(token row, expert, gate) triples, sorted by expert; `_experts` runs them; the rule adds the
gated outputs back to their tokens. `routing="top1"` is the paper's (Eq. 1-3: one expert a token).
`routing="expert_choice"` is Zhou et al. (NeurIPS 2022): the same softmax over experts for each
token, then each expert keeps its k = round(c·n/E) highest-scoring real tokens of a routing group
of n (c the capacity factor; c = 1 spends top-1's expert FLOPs); a token gets the sum of its
choosers' gated outputs, or 0 if none chose it; no balance loss (every expert has k tokens).
The routing group is one sequence (its real tokens) for 3-D input, so a sentence's output never
depends on its batch mates or the batch size, in pretraining and evaluation alike; a 2-D input
(M, H) without a mask is one group of M tokens.

Copy this file alone into another project: it imports only torch.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


ROUTINGS = ("top1", "expert_choice")


class SwitchFFN(nn.Module):
    """Switch-Transformer FFN layer: router (Eq. 1), top-1 (Eq. 2), p_i(x)·E_i(x) (Eq. 3),
    balance loss KL(uniform || mean router probability) over the batch's tokens (Eq. 4-5)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, group=None,
                 routing: str = "top1", capacity_factor: float = 1.0):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
        if not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"capacity factor {capacity_factor} must be a positive number (1 spends top-1's FLOPs)")
        self.routing, self.capacity_factor = routing, float(capacity_factor)
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if num_experts % self.world:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.world} "
                             f"ranks: choose a world size that divides the number of experts")
        # a weak reference: torch.distributed owns the group, and destroy_process_group must really
        # destroy it (joining gloo's threads) while the interpreter is alive; a strong one here kept it
        # to interpreter exit, where a gloo thread freeing an all-to-all buffer aborted the process
        self._group = weakref.ref(group) if group is not None else None
        self.num_experts = num_experts
        self.local_experts = num_experts // self.world
        self.router = nn.Linear(hidden_size, num_experts)      # W_r, b_r of Eq. 1
        E, H, Fd = self.local_experts, hidden_size, intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, H, Fd))
        self.b1 = nn.Parameter(torch.zeros(E, Fd))
        self.w2 = nn.Parameter(torch.empty(E, Fd, H))
        self.b2 = nn.Parameter(torch.zeros(E, H))
        for p in (self.w1, self.b1, self.w2, self.b2):
            p.expert = True
        for p in (self.b1, self.b2):
            p.no_weight_decay = True                           # biases: see model.adamw_warmup_linear
        self.reset_parameters()
        self.last_counts = torch.zeros(num_experts, dtype=torch.long)  # tokens per expert, last call (on x's device)
        self.last_choosers = torch.zeros(0, dtype=torch.long)  # expert choice: experts per real token, last call
        if group is not None:
            self._check_group(hidden_size, intermediate_size)

    @property
    def group(self):
        """The expert-parallel process group, or None for a local layer."""
        return None if self._group is None else _alive(self._group)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        # draw all E experts and keep this rank's slice: the same seed gives the same experts
        # whatever the world size, so a sharded run starts where a one-process run starts
        lo = self.rank * self.local_experts
        for w in (self.w1, self.w2):
            w.copy_(torch.randn(self.num_experts, *w.shape[1:], device=w.device)[lo:lo + self.local_experts] * std)
        self.b1.zero_()
        self.b2.zero_()

    def _check_group(self, hidden_size: int, intermediate_size: int) -> None:
        # every rank must agree before any token moves, or a mismatch would hang the exchange
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"  # NCCL moves only GPU tensors
        mine = torch.tensor([hidden_size, intermediate_size, self.num_experts], dtype=torch.long, device=device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=self.group)
        if any(not torch.equal(mine, other) for other in everyone):
            raise ValueError("SwitchFFN configuration differs across ranks (hidden, intermediate, "
                             f"experts): {[o.tolist() for o in everyone]}; build the same model everywhere")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """x: [..., H]; mask: [...] bool, False for padding (kept out of routing and Eq. 4).
        Returns y like x (zero at padding) and the scalar balance loss (0 with expert choice)."""
        if self.routing == "expert_choice":
            return self._expert_choice(x, mask)
        return self._top1(x, mask)

    def _top1(self, x: torch.Tensor, mask: torch.Tensor | None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                 # (N, H)
        keep = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        tokens = x if keep is None else _Permute.apply(x, keep)     # (M, H) real tokens
        probs = self.router(tokens).float().softmax(-1)              # Eq. 1, (M, E)
        gate, expert = probs.max(-1)                                 # Eq. 2
        mean_prob = probs.mean(0)                                    # Eq. 4
        # Eq. 5: KL(p || q) with p uniform = sum_k (1/E) log((1/E) / q_k) = -log E - mean_k log q_k
        balance_loss = -math.log(self.num_experts) - mean_prob.log().mean()
        order = expert.argsort(stable=True)
        counts = torch.bincount(expert, minlength=self.num_experts)
        self.last_counts = counts.detach()
        y = self._experts(_Permute.apply(tokens, order), counts)   # the seam: tokens leave and return
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.numel(), device=order.device)
        y = _Permute.apply(y, unsort) * gate.unsqueeze(1).to(y.dtype)  # Eq. 3
        if keep is not None:
            y = x.new_zeros(x.shape[0], y.shape[1], dtype=y.dtype).index_copy(0, keep, y)  # padding -> 0
        return y.reshape(shape), balance_loss

    def _expert_choice(self, x: torch.Tensor, mask: torch.Tensor | None):
        """Expert-choice routing: in each group (a sequence, or a 2-D x as a whole) every expert takes
        the k real tokens it scores highest, k = round(c·n/E) within [1, n] (n real tokens)."""
        shape, E = x.shape, self.num_experts
        groups = x.reshape(-1, shape[-2] if x.dim() > 2 else shape[0], shape[-1])  # (G, T, H)
        G, T, H = groups.shape
        real = torch.ones(G, T, dtype=torch.bool, device=x.device) if mask is None else mask.reshape(G, T)
        flat = groups.reshape(G * T, H)
        probs = self.router(flat).float().softmax(-1)                # as Eq. 1: over experts, (G*T, E)
        probs = probs.masked_fill(~real.reshape(-1, 1), -1.0)         # padding ranks below every real token
        n = real.sum(1)                                               # (G,) real tokens per group
        k = torch.minimum((self.capacity_factor * n / E + 0.5).floor().long().clamp(min=1), n)  # half up
        k_max = int(k.max()) if G else 0
        gate, pos = probs.view(G, T, E).transpose(1, 2).topk(k_max, dim=-1)   # (G, E, k_max): TopK(S^T, k)
        taken = (torch.arange(k_max, device=x.device) < k.view(G, 1, 1)).expand(G, E, k_max)
        row = pos + torch.arange(G, device=x.device).view(G, 1, 1) * T        # row of flat
        row = row.transpose(0, 1)[taken.transpose(0, 1)]              # (E*K,) expert-major
        gate = gate.transpose(0, 1)[taken.transpose(0, 1)]            # (E*K,) each choice's score
        counts = torch.full((E,), int(k.sum()), dtype=torch.long, device=x.device)
        self.last_counts = counts
        self.last_choosers = torch.bincount(row, minlength=G * T)[real.reshape(-1)].detach()
        # index_select's backward adds the rows of a token that several experts chose (index_add)
        ys = self._experts(flat.index_select(0, row), counts)
        ys = ys * gate.unsqueeze(1).to(ys.dtype)                      # scaled by its score, not renormalised
        y = ys.new_zeros(G * T, H).index_add(0, row, ys)              # summed per token; unchosen: 0
        return y.reshape(shape), probs.new_zeros(())

    def mutual_distillation_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Our reading of MoDE (Xie et al., AAAI 2024; its loss is not public): the mean squared distance
        between the outputs of every ordered pair of experts (before the gate) on the same tokens,
            1 / (T·E·(E−1)) · Σ_t Σ_{i≠j} ‖E_i(x_t) − E_j(x_t)‖²,
        by Σ_{i≠j}‖a_i − a_j‖² = 2E·Σ_i‖a_i − ā‖² (O(E), and exact 0 for equal experts).
        tokens: (T, H), taken as data (detached): the pull acts on the experts, not on the router or
        the trunk. Expert-parallel: each rank passes its own tokens; the loss is over every rank's."""
        tokens = tokens.detach().reshape(-1, tokens.shape[-1])
        if self.group is not None:
            tokens = _gather_rows(tokens, self.group)
        T, E, El = tokens.shape[0], self.num_experts, self.local_experts
        counts = torch.full((El,), T, dtype=torch.long, device=tokens.device)
        xs, weights = self._cast(tokens.repeat(El, 1), (self.w1, self.b1, self.w2, self.b2))
        with torch.autocast(tokens.device.type, enabled=False):
            outs = _expert_ffn(xs, counts, *weights).float().view(El, T, -1)   # (E_local, T, H)
        total = outs.sum(0)
        if self.group is not None:
            total = _AllReduce.apply(total, self.group)
        spread = (outs - total / E).pow(2).sum()                      # Σ_t Σ_i ‖a_i − ā‖², this rank's experts
        if self.group is not None:
            spread = _AllReduce.apply(spread, self.group)
        return 2 * E * spread / max(T * E * (E - 1), 1)

    @staticmethod
    def _cast(xs: torch.Tensor, weights):
        """(xs, weights) in the dtype the experts run in: under autocast, bf16 on GPUs; float32 on CPUs,
        where in bf16 each new row count makes oneDNN compile a kernel, and even with every kernel
        compiled bf16 was no faster (README, Speed)."""
        if torch.is_autocast_enabled(xs.device.type):               # one cast, then exact dtypes
            dtype = torch.get_autocast_dtype(xs.device.type) if xs.is_cuda else torch.float32
            return xs.to(dtype), [w.to(dtype) for w in weights]
        return xs, list(weights)

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run xs (sorted by global expert id, counts[e] rows each) through their experts."""
        xs, weights = self._cast(xs, (self.w1, self.b1, self.w2, self.b2))
        with torch.autocast(xs.device.type, enabled=False):
            if self.group is None:
                return _expert_ffn(xs, counts, *weights)
            return self._experts_remote(xs, counts, weights)

    def _experts_remote(self, xs, counts, weights) -> torch.Tensor:
        W, E = self.world, self.local_experts
        # counts per (destination rank, local expert) go first, so every rank knows what arrives
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # (W*E,) source-major
        send = counts.view(W, E).sum(1).tolist()
        recv_matrix = recv_counts.view(W, E)                          # [source rank, local expert]
        recv = recv_matrix.sum(1).tolist()
        arrived = _all_to_all(xs, send, recv, self.group)            # grouped by source, then expert
        # regroup by local expert: arrived is source-major, experts need expert-major
        owner = torch.arange(E, device=xs.device).repeat(W).repeat_interleave(recv_matrix.reshape(-1))
        by_expert = owner.argsort(stable=True)
        ys = _expert_ffn(_Permute.apply(arrived, by_expert), recv_matrix.sum(0), *weights)
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel(), device=xs.device)
        return _all_to_all(_Permute.apply(ys, back), recv, send, self.group)


# ----------------------------------------------------------------------------- inside the layer
# How SwitchFFN moves tokens and runs its experts. Not needed to follow the paper: plain indexing,
# a loop over experts and torch.distributed would compute the same (tests/test_moe.py checks them
# against a token-by-token loop); these are the cheaper forms.

class _Permute(torch.autograd.Function):
    """Rows of x in `index` order. Backward scatters them back without accumulation (index
    has no repeats), which is cheaper than the generic indexing backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_copy_(0, index, grad), None


class _ExpertFFN(torch.autograd.Function):
    """GELU FFNs of E experts on tokens already sorted by expert (`counts[e]` rows each).

    A Python loop of one `addmm`/`mm` per expert into preallocated buffers: on CPUs this beats
    padding to the busiest expert + `bmm` and `grouped_mm` (see bench.py), and the GELU and
    its backward run once over all tokens instead of once per expert."""

    @staticmethod
    def forward(ctx, xs, counts: list[int], w1, b1, w2, b2):
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        spans = [(e, s, t) for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])) if t > s]
        h = xs.new_empty(xs.shape[0], w1.shape[2])            # (N, F)
        for e, s, t in spans:
            torch.addmm(b1[e], xs[s:t], w1[e], out=h[s:t])
        a = F.gelu(h)
        y = xs.new_empty(xs.shape[0], w2.shape[2])            # (N, H)
        for e, s, t in spans:
            torch.addmm(b2[e], a[s:t], w2[e], out=y[s:t])
        ctx.save_for_backward(xs, h, a, w1, w2)
        ctx.spans = spans
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, h, a, w1, w2 = ctx.saved_tensors
        gy = gy.contiguous()
        gw1, gb1 = torch.empty_like(w1), w1.new_empty(w1.shape[0], w1.shape[2])
        gw2, gb2 = torch.empty_like(w2), w2.new_empty(w2.shape[0], w2.shape[2])
        for e in set(range(w1.shape[0])) - {e for e, _, _ in ctx.spans}:  # experts that got no token
            for g in (gw1, gb1, gw2, gb2):
                g[e].zero_()
        ga, gx = torch.empty_like(h), torch.empty_like(xs)
        for e, s, t in ctx.spans:
            torch.mm(a[s:t].T, gy[s:t], out=gw2[e])
            torch.sum(gy[s:t], 0, out=gb2[e])
            torch.mm(gy[s:t], w2[e].T, out=ga[s:t])
        gh = torch.ops.aten.gelu_backward(ga, h)
        for e, s, t in ctx.spans:
            torch.mm(xs[s:t].T, gh[s:t], out=gw1[e])
            torch.sum(gh[s:t], 0, out=gb1[e])
            torch.mm(gh[s:t], w1[e].T, out=gx[s:t])
        return gx, None, gw1, gb1, gw2, gb2


def _expert_ffn(xs: torch.Tensor, counts: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """The experts on rows sorted by expert, counts[e] rows each: on CPUs one addmm per expert
    (_ExpertFFN), on GPUs padded batched matmuls (_padded_experts); where every expert has the
    same count (expert choice's static buckets), batched matmuls with no padding at all."""
    sizes = counts.tolist()
    if xs.shape[0] and all(c == sizes[0] for c in sizes):
        return _static_experts(xs, len(sizes), w1, b1, w2, b2)
    if xs.is_cuda:
        return _padded_experts(xs, counts, w1, b1, w2, b2)
    return _ExpertFFN.apply(xs, sizes, w1, b1, w2, b2)


def _static_experts(xs: torch.Tensor, E: int, w1, b1, w2, b2) -> torch.Tensor:
    """E experts with k rows each, (E*k, H) expert-major: two batched matmuls."""
    h = F.gelu(torch.baddbmm(b1.unsqueeze(1), xs.view(E, -1, xs.shape[1]), w1))   # (E, k, F)
    return torch.baddbmm(b2.unsqueeze(1), h, w2).reshape(xs.shape[0], -1)          # (E*k, H)


def _padded_experts(xs: torch.Tensor, counts: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """Every expert padded to the busiest one, then two batched matmuls: on a GPU, E small
    kernels and their launches cost far more than multiplying the padding rows."""
    E, N = counts.numel(), xs.shape[0]
    expert = torch.repeat_interleave(torch.arange(E, device=xs.device), counts, output_size=N)
    slot = torch.arange(N, device=xs.device) - (counts.cumsum(0) - counts)[expert]  # row within its expert
    capacity = int(counts.max()) if N else 0
    padded = xs.new_zeros(E, capacity, xs.shape[1]).index_put((expert, slot), xs)  # (E, C, H)
    h = F.gelu(torch.baddbmm(b1.unsqueeze(1), padded, w1))                        # (E, C, F)
    return torch.baddbmm(b2.unsqueeze(1), h, w2)[expert, slot]                     # padding rows never read


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows: send[r] rows go to rank r, recv[r] rows arrive from it. The
    backward is the same exchange with the roles swapped (gradients travel back the way the
    rows came). Written over `dist.all_to_all_single`, which has no autograd of its own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, weakref.ref(group)    # borrowed: see SwitchFFN
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=_alive(ctx.group))
        return back, None, None, None


def _alive(group_ref: weakref.ref):
    group = group_ref()
    if group is None:
        raise RuntimeError("the process group of this expert-parallel layer was destroyed: "
                           "build the model again after init_process_group")
    return group


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows: send[r] rows go to rank r, recv[r] come back."""
    return _AllToAll.apply(x, send, recv, group)


class _AllReduce(torch.autograd.Function):
    """Sum over the ranks of a group. Every rank then holds the same loss and backpropagates it, so
    the gradient is summed over ranks too (sync_gradients divides it by the world like the rest)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = weakref.ref(group)
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=_alive(ctx.group))
        return grad, None


@torch.no_grad()
def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows of x (not differentiable), rank by rank; ranks may hold different counts."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    most = int(max(sizes))
    padded = x.new_zeros(most, *x.shape[1:])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])


# ----------------------------------------------------------------------------- training with sharded experts

def _sharded(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, SwitchFFN) and m.group is not None:
            yield name, m


def sync_gradients(model: nn.Module, world: int) -> None:
    """Average dense gradients over ranks; expert gradients are already complete on their
    owner (the all-to-all backward brought every rank's tokens' contributions), so they are
    only scaled by 1/world like the rest. An explicit flat all-reduce instead of DDP, whose
    buckets would all-reduce the sharded experts too; it runs after accumulation, once a step."""
    dense = [p.grad for p in model.parameters() if p.grad is not None and not getattr(p, "expert", False)]
    flat = torch.cat([g.reshape(-1) for g in dense])
    dist.all_reduce(flat)
    offset = 0
    for g in dense:
        g.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(world)
        offset += g.numel()
    for p in model.parameters():
        if getattr(p, "expert", False) and p.grad is not None:
            p.grad.div_(world)


def _expert_groups(model: nn.Module) -> dict:
    """id(expert parameter) -> its SwitchFFN, for every expert-parallel layer."""
    return {id(getattr(m, n)): m for _, m in _sharded(model) for n in ("w1", "b1", "w2", "b2")}


def clip_gradients(model: nn.Module, max_norm: float, sharded: bool) -> float:
    """clip_grad_norm_ over the whole model, including expert shards held by other ranks of
    each layer's expert group (dense gradients are already equal on every rank)."""
    owners = _expert_groups(model) if sharded else {}
    grads = [(p.grad, getattr(p, "expert", False), owners.get(id(p))) for p in model.parameters() if p.grad is not None]
    dense_sq = sum(g.float().pow(2).sum() for g, e, _ in grads if not e)
    total_sq = dense_sq + sum((g.float().pow(2).sum() for g, e, m in grads if e and m is None),
                              torch.zeros((), device=grads[0][0].device))
    by_group: dict = {}
    for g, _, m in grads:
        if m is not None:
            by_group.setdefault(m.group, []).append(g)
    for group, gs in by_group.items():                # experts: summed over their group's shards
        sq = sum(g.float().pow(2).sum() for g in gs)
        dist.all_reduce(sq, group=group)
        total_sq = total_sq + sq
    norm = float(total_sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        for g, _, _ in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm
