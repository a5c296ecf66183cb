"""Hand-written post-LN BERT (Devlin et al., 2019) with an optional Switch MoE FFN (moe.py).

    cfg = BertConfig.preset("small", num_experts=64)
    mlm = BertForMaskedLM(cfg)
    res = mlm(input_ids, attention_mask, labels=labels)   # res.loss, res.logits, res.balance_loss
    out = mlm.bert(input_ids, attention_mask, taps=True)  # out.taps: the relation sites of Fig. 3

Also here: the classification model with Houlsby adapters used by finetune.py, checkpoint
save/load (atomic writes, `weights_only=True` loads), and Hugging Face BERT directories in and
out: `read_checkpoint` takes one wherever a checkpoint is expected, `from_hf_bert` reads one and
`to_hf_bert` writes a dense model as one. The layer is numerically the same as `transformers.BertModel`
(tests/test_model.py checks it on shared random weights).

Shapes: B batch, T sequence length, H hidden size (the paper's H), nh heads, hs = H / nh head
size, V vocabulary, n_masked scored positions. The paper's code comes first; the CPU speed code
(cheaper dropout masks, written-out attention, the allocator setting) is at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
            self.ffn = SwitchFFN(H, cfg.intermediate_size, cfg.num_experts, group=expert_group)
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


MASKED_ROWS_BUCKET = 128


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
        # pad the row count up to a multiple of MASKED_ROWS_BUCKET: the count changes every step, and
        # buffers of ever-new sizes fragmented the heap (a tiny run grew to 10 GB) and filled
        # oneDNN's kernel cache; padding rows repeat row 0 and are ignored by the loss
        rows = -(-n // MASKED_ROWS_BUCKET) * MASKED_ROWS_BUCKET
        index = torch.cat([index, index.new_zeros(rows - n)])
        logits = self.head(out.hidden.reshape(-1, out.hidden.shape[-1]).index_select(0, index))  # (rows, V)
        targets = torch.cat([labels.reshape(-1)[index[:n]], labels.new_full((rows - n,), -100)])
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


def adamw_warmup_linear(model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int,
                        betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW (β 0.9/0.999 by default, fused kernel; the paper says Adam with an L2 weight, AdamW's decoupled
    decay is our choice) without decay on biases and LayerNorms over the trainable
    parameters, lr warmed up linearly for `warmup` steps, then decayed linearly to 0 at `total`."""
    norms = {id(p) for mod in model.modules() if isinstance(mod, nn.LayerNorm) for p in mod.parameters()}
    decay, plain = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = id(p) in norms or n.endswith("bias") or getattr(p, "no_weight_decay", False)  # moe.py tags b1, b2
        (plain if no_decay else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}],
                                  lr=lr, betas=betas, fused=True)  # one pass: 3x faster on CPU
    schedule = lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
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


# ---------------------------------------------------------------- checkpoints and tokenizer

class InputFileError(ValueError):
    """An input file that is missing or is not what it should be (reported as one line, exit code 2)."""


class CheckpointError(InputFileError):
    """A file that is missing or is not a checkpoint of this project."""


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def finite_float(text: str) -> float:
    """argparse type for float flags: a number, and a finite one (inf or nan would train to NaN weights)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def save_checkpoint(path, module: nn.Module, **extra) -> None:
    """torch.save of {config, model: state dict, **extra} to a temp file, then os.replace, so a
    crash never leaves a torn file. extra may replace `model` (e.g. experts gathered from ranks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": asdict(module.config), "model": module.state_dict(), **extra}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once, and only when there is one (the paper's value, where given, is the default)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in (action.help or "") \
                or "paper:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def write_json(path, data) -> None:
    """JSON to a temp file, then os.replace: a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


REPO = Path(__file__).resolve().parent


def portable_path(path) -> str:
    """A path as results JSON records it: relative to this repository (e.g. ../runs/ckpt/moe.pt), so a
    file committed under results/ names no machine's directories."""
    return os.path.relpath(Path(path).resolve(), REPO)


def portable_args(args, *paths: str) -> dict:
    """vars(args) as results JSON keeps them: the named path flags (a path or a list) made portable."""
    shown = {}
    for name in paths:
        value = getattr(args, name)
        if value:
            shown[name] = [portable_path(p) for p in value] if isinstance(value, list) else portable_path(value)
    return {**vars(args), **shown}


def check_checkpoint_path(path) -> None:
    """Cheap early check that `path` can be a checkpoint (a file, or a directory with config.json)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise CheckpointError(f"{p} is a directory but not a Hugging Face BERT directory: expected config.json, "
                              "model.safetensors or pytorch_model.bin, and vocab.txt")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found: pass a .pt file written by pretrain.py "
                              "or a Hugging Face BERT directory")


def unwritable(directory) -> str | None:
    """Why files cannot be written into `directory` (created if missing), or None if they can."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def read_checkpoint(path) -> dict:
    """The checkpoint dict of a .pt file (loaded with weights_only=True) or of a Hugging Face BERT
    directory (read_hf_bert); CheckpointError naming what was expected if it is neither."""
    path = Path(path)
    check_checkpoint_path(path)
    if path.is_dir():
        return read_hf_bert(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                              "pass a .pt file written by pretrain.py or a Hugging Face BERT directory") from None
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this project "
                              "(no 'config'/'model'); pass a Hugging Face BERT directory as a directory")
    return ckpt


def read_hf_bert(directory) -> dict:
    """A Hugging Face BERT directory (config.json, weights, vocab.txt) as a checkpoint dict of this
    project: config, model, vocab (None without vocab.txt), and mlm_head (False when the weights
    hold a bare encoder, whose head is then random)."""
    d = Path(directory)
    check_checkpoint_path(d)
    model, has_head = _hf_bert(d)
    vocab = read_vocab(d / "vocab.txt") if (d / "vocab.txt").is_file() else None
    if vocab is not None and len(vocab) != model.config.vocab_size:
        raise CheckpointError(f"{d}: vocab.txt has {len(vocab):,} tokens but config.json says vocab_size "
                              f"{model.config.vocab_size:,}")
    return {"config": asdict(model.config), "model": model.state_dict(), "vocab": vocab, "mlm_head": has_head,
            "hf_dir": str(d)}


def load_checkpoint(path) -> tuple[BertForMaskedLM, dict]:
    """(BertForMaskedLM with the saved weights, the checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model = BertForMaskedLM(BertConfig.from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the saved config: {str(e).splitlines()[0]}") from None
    return model, ckpt


def read_vocab(path) -> list[str]:
    """A WordPiece vocab.txt as a list (line number = token id)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file {path} not found: pass a WordPiece vocab.txt")
    try:
        tokens = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise InputFileError(f"vocab file {path} is not UTF-8 text: pass a WordPiece vocab.txt") from None
    tokens = tokens[:-1] if tokens and tokens[-1] == "" else tokens
    missing = [t for t in BERT_SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise InputFileError(f"{path} is not a BERT WordPiece vocabulary: it has no {', '.join(missing)} "
                             f"(pass a vocab.txt such as data/bert-base-uncased-vocab.txt)")
    return tokens


def make_tokenizer(vocab: list[str]):
    """BERT uncased WordPiece tokenizer (`tokenizers`) over a vocab list (line = id)."""
    from tokenizers import BertWordPieceTokenizer
    return BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)


def from_hf_bert(directory) -> BertForMaskedLM:
    """A BertForMaskedLM from a Hugging Face BERT directory: config.json plus model.safetensors
    (needs the optional `safetensors` package) or pytorch_model.bin. Without an MLM head in
    the weights (a bare BertModel), the head keeps its random initialisation."""
    return _hf_bert(Path(directory))[0]


def _hf_bert(d: Path) -> tuple[BertForMaskedLM, bool]:
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} has no config.json: pass a Hugging Face BERT model directory")
    hf = json.loads((d / "config.json").read_text())
    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{d}: model_type {hf['model_type']!r} is not supported (only 'bert')")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{d}: hidden_act {hf['hidden_act']!r} is not supported (only 'gelu')")
    cfg = BertConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                     num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                     intermediate_size=hf["intermediate_size"], max_position=hf["max_position_embeddings"],
                     type_vocab_size=hf.get("type_vocab_size", 2), dropout=hf.get("hidden_dropout_prob", 0.1),
                     attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                     layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pad_token_id=hf.get("pad_token_id", 0) or 0)
    if (d / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError("reading model.safetensors needs the safetensors package: "
                                  "pip install safetensors") from None
        hf_state = load_file(str(d / "model.safetensors"))
    elif (d / "pytorch_model.bin").is_file():
        hf_state = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{d} has neither model.safetensors nor pytorch_model.bin")
    hf_state = {k.removeprefix("bert."): v for k, v in hf_state.items()}
    model = BertForMaskedLM(cfg)
    try:
        missing, _ = model.load_state_dict(_convert_hf_state(hf_state, cfg), strict=False)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{d}: weights do not match a BERT of its config.json ({e})") from None
    if any(k.startswith("bert.") for k in missing):
        raise CheckpointError(f"{d}: encoder weights missing from the file: {missing[:3]}")
    return model, "decoder_bias" not in missing


def to_hf_bert(mlm: BertForMaskedLM, directory, vocab: list[str] | None = None) -> None:
    """Write a dense model as a Hugging Face BERT directory (config.json, model.safetensors, and
    vocab.txt when given) that transformers.BertForMaskedLM.from_pretrained loads with the same
    logits. Written into a temp directory and renamed, so a crash leaves no half directory."""
    cfg, d = mlm.config, Path(directory)
    if cfg.moe:
        raise CheckpointError(f"a MoE model ({cfg.num_experts} experts) cannot be written as a Hugging Face BERT: "
                              "that format has one dense FFN per layer, no router and no experts")
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise CheckpointError(f"{d} exists and is not an empty directory: pass a new directory")
    from safetensors.torch import save_file
    hf = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu", "max_position_embeddings": cfg.max_position,
          "type_vocab_size": cfg.type_vocab_size, "hidden_dropout_prob": cfg.dropout,
          "attention_probs_dropout_prob": cfg.attention_dropout, "layer_norm_eps": cfg.layer_norm_eps,
          "pad_token_id": cfg.pad_token_id, "initializer_range": 0.02, "position_embedding_type": "absolute",
          "tie_word_embeddings": True}
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=d.name + ".", suffix=".tmp"))
    try:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file(_to_hf_state(mlm.state_dict(), cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if vocab is not None:
            (tmp / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
        if d.exists():
            d.rmdir()
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_names(cfg: BertConfig) -> list[tuple[str, str]]:
    """(our name, HF's name without the "bert." prefix) of every weight but the fused qkv."""
    pairs = [("bert.word.weight", "embeddings.word_embeddings.weight"),
             ("bert.position.weight", "embeddings.position_embeddings.weight"),
             ("bert.token_type.weight", "embeddings.token_type_embeddings.weight")]
    sublayers = [("bert.ln", "embeddings.LayerNorm")] + [
        (f"bert.layers.{i}.{ours}", f"encoder.layer.{i}.{hf}") for i in range(cfg.num_layers)
        for ours, hf in (("attn_out", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                         ("ffn.fc1", "intermediate.dense"), ("ffn.fc2", "output.dense"), ("ln2", "output.LayerNorm"))]
    sublayers += [("transform", "cls.predictions.transform.dense"), ("transform_ln", "cls.predictions.transform.LayerNorm")]
    pairs += [(f"{ours}.{t}", f"{hf}.{t}") for ours, hf in sublayers for t in ("weight", "bias")]
    return pairs + [("decoder_bias", "cls.predictions.bias")]


def _convert_hf_state(s: dict, cfg: BertConfig) -> dict:
    """HF BERT weights (names without "bert.") as ours; the MLM head only where the file has one."""
    out = {ours: s[hf] for ours, hf in _hf_names(cfg) if not hf.startswith("cls.") or "cls.predictions.bias" in s}
    for i in range(cfg.num_layers):
        att = f"encoder.layer.{i}.attention.self."
        for t in ("weight", "bias"):
            out[f"bert.layers.{i}.qkv.{t}"] = torch.cat([s[att + n + "." + t] for n in ("query", "key", "value")])
    return out


def _to_hf_state(s: dict, cfg: BertConfig) -> dict:
    """The inverse of _convert_hf_state, with HF BertForMaskedLM's names (contiguous copies, as
    safetensors needs; the decoder weight is the word embedding, as HF ties it)."""
    out = {(hf if hf.startswith("cls.") else "bert." + hf): s[ours] for ours, hf in _hf_names(cfg)}
    for i in range(cfg.num_layers):
        for t in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), s[f"bert.layers.{i}.qkv.{t}"].chunk(3)):
                out[f"bert.encoder.layer.{i}.attention.self.{name}.{t}"] = part
    out["cls.predictions.decoder.weight"] = s["bert.word.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


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


def tune_allocator() -> None:
    """Keep freed memory in the process (glibc): training re-allocates the same big buffers each
    step, and re-mapping them page-faults for 1.3-1.7x tokens/s. The limits are mallopt's largest
    (2 GiB): at 1 GiB, HF's reference step still gave its heap top back and re-faulted 1.5-2 GB a
    step (1.3 s -> 1.7-2.1 s, small preset). Scripts call it; import does not."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 2**31 - 1)        # M_TRIM_THRESHOLD: do not give the heap top back
    libc.mallopt(-3, 2**31 - 1)        # M_MMAP_THRESHOLD: serve large blocks from the heap
