"""Hand-written post-LN BERT (Devlin et al., 2019) with an optional Switch MoE FFN (moe.py).

    cfg = BertConfig.preset("small", num_experts=64)
    mlm = BertForMaskedLM(cfg)
    res = mlm(input_ids, attention_mask, labels=labels)   # res.loss, res.logits, res.balance_loss
    out = mlm.bert(input_ids, attention_mask, taps=True)  # out.taps: the relation sites of Fig. 3

Also here: the classification model with Houlsby adapters that finetune.py trains, AdamW with
BERT's warm-up schedule, MLM masking and "Pre-Train Perf.". Nothing else: checkpoints and Hugging
Face directories are checkpoint.py's, command lines the stage scripts'. The layer is numerically
the same as `transformers.BertModel` (tests/test_model.py checks it on shared random weights).

Shapes: B batch, T sequence length, H hidden size (the paper's H), nh heads, hs = H / nh head
size, V vocabulary, n_masked scored positions. The paper's code comes first; the CPU speed code
(cheaper dropout masks, written-out attention, bucketed masked rows) is at the end.

Copy this file with moe.py (for MoE configs) into another project: it imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # tiny: a CPU demo size (4 layers of the small width), ~4.7M parameters dense
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=512),
    "small": dict(hidden_size=128, num_layers=12, num_heads=2, intermediate_size=512),  # 6.3M
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),  # 110M
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 128
    num_layers: int = 12
    num_heads: int = 2
    intermediate_size: int = 512
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    num_experts: int = 0          # 0 or 1: dense FFN; >1: SwitchFFN with that many experts
    routing: str = "top1"         # MoE: "top1" (the paper's) or "expert_choice" (moe.py)
    capacity_factor: float = 1.0  # expert choice: tokens per expert = round(c·n/E) of a sequence's n
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def moe(self) -> bool:
        return self.num_experts > 1


@dataclass
class EncoderOutput:
    hidden: torch.Tensor                 # (B, T, H)
    balance_loss: torch.Tensor           # sum of Eq. 5 over MoE layers; 0 for dense
    taps: dict | None = None


@dataclass
class MaskedLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor                 # (n_masked, V), or (B, T, V) without labels
    balance_loss: torch.Tensor
    taps: dict | None = None             # the encoder's taps when called with taps=True


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor                 # (B, num_labels)
    balance_loss: torch.Tensor


class Adapter(nn.Module):
    """Houlsby et al. (2019) bottleneck: x + up(gelu(down(x))), initialised near identity."""

    def __init__(self, hidden_size: int, size: int):
        super().__init__()
        self.down, self.up = nn.Linear(hidden_size, size), nn.Linear(size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=1e-3)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


class FFN(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return self.fc2(F.gelu(self.fc1(x))), x.new_zeros((), dtype=torch.float32)


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig, adapter_size: int = 0, expert_group=None):
        super().__init__()
        H, self.nh = cfg.hidden_size, cfg.num_heads
        self.qkv = nn.Linear(H, 3 * H)                   # fused query, key, value
        self.attn_out = nn.Linear(H, H)
        self.ln1 = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        if cfg.moe:
            from moe import SwitchFFN
            self.ffn = SwitchFFN(H, cfg.intermediate_size, cfg.num_experts, group=expert_group,
                                 routing=cfg.routing, capacity_factor=cfg.capacity_factor)
        else:
            self.ffn = FFN(cfg)
        self.ln2 = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.attn_adapter = Adapter(H, adapter_size) if adapter_size else nn.Identity()
        self.ffn_adapter = Adapter(H, adapter_size) if adapter_size else nn.Identity()
        self.drop, self.attn_drop = Dropout(cfg.dropout), cfg.attention_dropout

    def forward(self, x, attn_mask, token_mask, taps: dict | None):
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.nh, H // self.nh).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        a = attention(q, k, v, attn_mask, self.attn_drop, self.training)
        a = self.attn_out(a.transpose(1, 2).reshape(B, T, H))
        x = self.ln1(x + self.drop(self.attn_adapter(a)))
        f, balance_loss = self.ffn(x, token_mask)
        y = self.ln2(x + self.drop(self.ffn_adapter(f)))
        if taps is not None:                            # the relation sites of Fig. 3
            taps["q"].append(q)
            taps["k"].append(k)
            taps["inner"] += [a, f]
            taps["trunk"] += [x, y]
        return y, balance_loss


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig, adapter_size: int = 0, expert_group=None):
        super().__init__()
        self.config = cfg
        H = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, H)
        self.token_type = nn.Embedding(cfg.type_vocab_size, H)
        self.ln = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg, adapter_size, expert_group) for _ in range(cfg.num_layers))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, taps: bool = False) -> EncoderOutput:
        B, T = input_ids.shape
        if T > self.config.max_position:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.config.max_position} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position.weight[:T] + self.token_type(token_type_ids)
        x = self.drop(self.ln(x))                                   # (B, T, H)
        attn_mask = token_mask = None
        if attention_mask is not None:
            token_mask = attention_mask.bool()
            attn_mask = token_mask[:, None, None, :]                  # (B, 1, 1, T): keys to attend
        tapped = {"trunk": [], "inner": [], "q": [], "k": []} if taps else None
        balance_loss = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, layer_balance = layer(x, attn_mask, token_mask, tapped)
            balance_loss = balance_loss + layer_balance
        return EncoderOutput(x, balance_loss, tapped)


def _init_weights(module: nn.Module) -> None:
    """BERT's init: N(0, 0.02) weights, zero biases, unit LayerNorms; adapters near identity."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Adapter):
            m.reset_parameters()


class BertForMaskedLM(nn.Module):
    def __init__(self, cfg: BertConfig, expert_group=None):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, expert_group=expert_group)
        H = cfg.hidden_size
        self.transform = nn.Linear(H, H)
        self.transform_ln = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # decoder weight is bert.word
        _init_weights(self)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.transform_ln(F.gelu(self.transform(h)))
        return F.linear(h, self.bert.word.weight, self.decoder_bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                taps: bool = False) -> MaskedLMOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, taps=taps)
        if labels is None:
            return MaskedLMOutput(None, self.head(out.hidden), out.balance_loss, out.taps)
        index = (labels.reshape(-1) != -100).nonzero().squeeze(1)   # (n_masked,): the head only where scored
        n = index.numel()
        index = bucketed_rows(index)                                   # (rows >= n,): see the speed code
        logits = self.head(out.hidden.reshape(-1, out.hidden.shape[-1]).index_select(0, index))  # (rows, V)
        targets = torch.cat([labels.reshape(-1)[index[:n]], labels.new_full((index.numel() - n,), -100)])
        loss = F.cross_entropy(logits.float(), targets) if n else logits.sum() * 0.0   # L_MLM, Eq. 12
        return MaskedLMOutput(loss, logits[:n], out.balance_loss, out.taps)


class BertForSequenceClassification(nn.Module):
    """Pooler + classifier; num_labels=1 is regression (MSE, STS-B). adapter_size>0 inserts
    Houlsby adapters after the attention output and after the FFN/MoE output of every layer
    and freezes everything but adapters, LayerNorms and the head (see `adapter_mode`)."""

    def __init__(self, cfg: BertConfig, num_labels: int, adapter_size: int = 0):
        super().__init__()
        self.config, self.num_labels, self.adapter_size = cfg, num_labels, adapter_size
        self.bert = BertModel(cfg, adapter_size=adapter_size)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        _init_weights(self)
        if adapter_size:
            self.adapter_mode()

    def adapter_mode(self) -> None:
        """Houlsby fine-tuning: train adapters, LayerNorms and the head; freeze the rest."""
        for name, p in self.named_parameters():
            p.requires_grad = ("adapter" in name or ".ln" in name or name.startswith(("bert.ln", "pooler", "classifier")))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids)
        pooled = torch.tanh(self.pooler(out.hidden[:, 0]))
        logits = self.classifier(self.drop(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(loss, logits, out.balance_loss)


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters with weight decay, and of those without (biases, LayerNorms);
    in this order they are the optimizer's parameters (checkpoint.py maps its state by it)."""
    norms = {id(p) for mod in model.modules() if isinstance(mod, nn.LayerNorm) for p in mod.parameters()}
    decay, plain = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = id(p) in norms or n.endswith("bias") or getattr(p, "no_weight_decay", False)  # moe.py tags b1, b2
        (plain if no_decay else decay).append(n)
    return decay, plain


def adamw_warmup_linear(model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int,
                        betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW (β 0.9/0.999 by default, fused kernel; the paper says Adam with an L2 weight, AdamW's decoupled
    decay is our choice) without decay on biases and LayerNorms over the trainable
    parameters, lr warmed up linearly for `warmup` steps, then decayed linearly to 0 at `total`."""
    params = dict(model.named_parameters())
    decay, plain = ([params[n] for n in names] for names in decay_split(model))
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}],
                                  lr=lr, betas=betas, fused=True)  # one pass: 3x faster on CPU
    schedule = lambda s: min((s + 1) / warmup if warmup else 1.0, max(0.0, (total - s) / max(1, total - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ---------------------------------------------------------------- masked-LM data and scoring

def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator, prob: float = 0.15):
    """BERT masking: `prob` of the non-special tokens are scored; of those 80% become [MASK],
    10% a random token, 10% stay. Returns (inputs, labels with -100 where not scored)."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & ~torch.isin(ids, special)
    labels = torch.where(chosen, ids, -100)
    r = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (r < 0.8), mask_id, ids)
    inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, labels


@torch.no_grad()
def masked_log_likelihood(model: BertForMaskedLM, input_ids, labels, attention_mask=None) -> tuple[float, int]:
    """(sum, count) of log p(original token) over positions with labels != -100: the paper's
    "Pre-Train Perf." is sum / count on held-out text (Table 1), Table 4 the same on OOD text."""
    res = model(input_ids, attention_mask, labels=labels)
    logp = res.logits.float().log_softmax(-1).gather(1, labels[labels != -100].unsqueeze(1))
    return logp.sum().item(), logp.numel()


# ---------------------------------------------------------------- speed code
# Not needed to follow the paper: the same arithmetic as F.dropout and F.scaled_dot_product_attention,
# made cheaper on CPUs (README, Speed). Tests check each against the plain version.

def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout with a cheaper mask on the CPU, where torch's bernoulli_ draws one mt19937 number
    per element (28% of a bf16 train step, small preset). Here each 64-bit draw gives four 16-bit
    uniforms; p is rounded to a multiple of 2^-16 and the 1/(1-p) scale uses that same p, so the
    output stays unbiased. It draws from torch's default generator: manual_seed reproduces it."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    n, drop = x.numel(), round(p * 65536)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    # P(keep) = 1 - drop / 2^16; comparing straight into x's dtype: a bool mask would be 10x slower to apply
    keep = torch.ge(bits.view(torch.int16)[:n].view(x.shape), drop - 32768, out=torch.empty_like(x))
    return x * keep.mul_(65536 / (65536 - drop))


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q, k, v, mask: torch.Tensor | None, p: float, training: bool) -> torch.Tensor:
    """Softmax attention over (B, nh, T, hs) tensors; mask (B, 1, 1, T) is True at keys to attend.
    SDPA, except on the CPU when training with dropout (SDPA's CPU kernels have none and its
    fallback draws the mask with bernoulli_) or in bf16 (its CPU flash kernel is 2-4x slower than
    these three ops at BERT's lengths, see README): there the same arithmetic is written out."""
    if q.device.type != "cpu" or not ((training and p > 0.0) or q.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)      # (B, nh, T, T)
    if mask is not None:
        scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    return dropout(scores.softmax(-1), p, training) @ v


MASKED_ROWS_BUCKET = 128


def bucketed_rows(index: torch.Tensor) -> torch.Tensor:
    """index padded with row 0 up to a multiple of MASKED_ROWS_BUCKET rows, the padding scored as -100:
    the masked count changes every step, and buffers of ever-new sizes fragment the heap and fill
    oneDNN's kernel cache; a few fixed sizes do neither."""
    rows = -(-index.numel() // MASKED_ROWS_BUCKET) * MASKED_ROWS_BUCKET
    return torch.cat([index, index.new_zeros(rows - index.numel())])
