"""Frozen-feature probes: what a checkpoint's representations hold before any fine-tuning.

Fine-tuning mixes two things: what pretraining put into the representations and how well a few
thousand labelled examples can re-purpose them. This probe keeps the encoder frozen and reads its
last layer, so it sees only the first (a recipe diagnostic of results/README.md, section 5):

- SST-2: a logistic regression (L2, LBFGS) on the mean-pooled and on the [CLS] vector of the first
  --max-train training sentences, accuracy on dev;
- STS-B: zero-shot, the Spearman correlation (x100) of the cosine between the two sentences'
  mean-pooled vectors with the gold scores on dev (no training at all).

    python results/feature_probe.py --ckpt ../runs/p19/vanilla.epoch12.pt ../runs/p19/scratch.pt \
        --data-dir ../shared/data/glue --out results/probes/features.json
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune import batches, encode, load_task, where_it_stood  # noqa: E402
from checkpoint import load_checkpoint, make_tokenizer, read_vocab  # noqa: E402
from common import portable_path, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def features(bert, encoded, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer (mean over real tokens, [CLS]) vectors, each (N, H), in the order of `encoded`."""
    bert.eval()
    means, cls = [], []
    for ids, mask, types, _ in batches(encoded, [0] * len(encoded), batch_size):
        hidden = bert(ids, mask, types).hidden.float()                          # (B, T, H)
        weight = mask.unsqueeze(-1).float()                                     # (B, T, 1)
        means.append((hidden * weight).sum(1) / weight.sum(1))
        cls.append(hidden[:, 0])
    return torch.cat(means), torch.cat(cls)


def logistic_accuracy(train_x, train_y, dev_x, dev_y, l2: float = 1e-3) -> float:
    """Accuracy (%) of an L2-regularised logistic regression on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mu) / sd, (dev_x - mu) / sd
    w = torch.zeros(train_x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
    y = torch.tensor(train_y, dtype=torch.float32)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(train_x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    pred = (dev_x @ w + b > 0).long()
    return 100.0 * (pred == torch.tensor(dev_y)).float().mean().item()


def probe(ckpt: str, data_dir: str, max_train: int) -> dict:
    mlm, saved = load_checkpoint(ckpt)
    vocab = saved.get("vocab") or read_vocab(HERE.parent / "data" / "bert-base-uncased-vocab.txt")
    tokenizer = make_tokenizer(vocab)
    sst2, stsb = load_task("sst2", data_dir), load_task("stsb", data_dir)
    train = tuple(col[:max_train] for col in sst2["train"])
    (train_mean, train_cls), (dev_mean, dev_cls) = (features(mlm.bert, encode(tokenizer, a, b, 128))
                                                    for a, b, _ in (train, sst2["dev"]))
    a, b, gold = stsb["dev"]
    (mean_a, _), (mean_b, _) = (features(mlm.bert, encode(tokenizer, s, [None] * len(s), 128)) for s in (a, b))
    cosine = F.cosine_similarity(mean_a, mean_b).tolist()
    return {"ckpt": portable_path(ckpt), **where_it_stood(mlm, saved, vocab),
            "sst2_acc_mean": logistic_accuracy(train_mean, train[2], dev_mean, sst2["dev"][2]),
            "sst2_acc_cls": logistic_accuracy(train_cls, train[2], dev_cls, sst2["dev"][2]),
            "stsb_spearman_cosine": 100.0 * spearmanr(cosine, gold).statistic}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="feature_probe.py", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints to probe")
    p.add_argument("--data-dir", required=True, help="GLUE directory with SST-2/ and STS-B/")
    p.add_argument("--max-train", type=int, default=9000, help="SST-2 training sentences (finetune.py's cut)")
    p.add_argument("--out", required=True, help="JSON file: one row per checkpoint")
    args = p.parse_args(argv)
    rows = []
    for ckpt in args.ckpt:
        rows.append(probe(ckpt, args.data_dir, args.max_train))
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
