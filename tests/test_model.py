"""model.py against HF transformers on the same weights (forward and training), parameter counts, adapters, taps, masking, the speed code."""
import json

import pytest
import torch
import torch.nn.functional as F

from checkpoint import from_hf_bert
from model import BertConfig, BertForMaskedLM, BertForSequenceClassification, attention, dropout, mask_tokens

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, fmt="safetensors", head=True):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    hf = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():               # HF inits biases and LayerNorms to constants: perturb everything
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = hf.state_dict() if head else {k: v for k, v in hf.state_dict().items() if k.startswith("bert.")}
    state = {k: v.contiguous() for k, v in state.items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    return hf


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 200, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    return ids, mask, types


@pytest.mark.equations
def test_training_matches_hf_bert_step_by_step(tmp_path):
    """25 AdamW steps of ours and of HF's BertForMaskedLM from the same weights on the same padded,
    masked batches (dropout off, fp32): every step's loss and the final weights agree. This checks
    every backward path written here (attention, the masked-only head, tied decoder), not only the forward."""
    from checkpoint import _convert_hf_state
    from model import adamw_warmup_linear
    hf = hf_model(tmp_path).train()
    ours = from_hf_bert(tmp_path).train()
    opt_ours, _ = adamw_warmup_linear(ours, 1e-3, 0.01, warmup=1, total=10**6)
    decay = [p for n, p in hf.named_parameters() if "LayerNorm" not in n and not n.endswith("bias")]
    plain = [p for n, p in hf.named_parameters() if "LayerNorm" in n or n.endswith("bias")]
    opt_hf = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}],
                               lr=1e-3, betas=(0.9, 0.999), fused=True)
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([0])
    for step in range(25):
        ids = torch.randint(1, 200, (4, 24), generator=g)
        mask = (torch.arange(24) < torch.randint(8, 25, (4, 1), generator=g)).long()
        ids = ids * mask
        inputs, labels = mask_tokens(ids, special, 3, 200, g, prob=0.3)
        loss_ours = ours(inputs, mask, labels=labels).loss
        loss_hf = hf(input_ids=inputs, attention_mask=mask, labels=labels).loss
        assert abs(loss_ours.item() - loss_hf.item()) < 2e-5, (step, loss_ours.item(), loss_hf.item())
        for model, loss, opt in ((ours, loss_ours, opt_ours), (hf, loss_hf, opt_hf)):
            loss.backward()
            opt.step()
            opt.zero_grad()
    hf_state = _convert_hf_state({k.removeprefix("bert."): v for k, v in hf.state_dict().items()}, ours.config)
    ours_state = dict(ours.state_dict())
    start = from_hf_bert(tmp_path).state_dict()
    assert max((ours_state[k] - v).abs().max().item() for k, v in start.items()) > 1e-3    # they did train
    H = ours.config.hidden_size
    for k in [k for k in hf_state if k.endswith("qkv.bias")]:
        # the key bias adds q·b_k to every score of a query: softmax ignores it, so its true gradient
        # is 0 and Adam turns float noise into lr-sized steps on both sides; compare query and value
        hf_state[k], ours_state[k] = (torch.cat([t[:H], t[2 * H:]]) for t in (hf_state[k], ours_state[k]))
    worst = max((ours_state[k] - v).abs().max().item() for k, v in hf_state.items())
    assert worst < 2e-5, worst




@pytest.mark.parametrize("preset,experts,paper", [("small", 0, 6.3e6), ("small", 64, 105e6),
                                                  ("base", 0, 110e6), ("base", 64, 3.6e9)])
def test_parameter_counts_match_paper(preset, experts, paper):
    with torch.device("meta"):
        model = BertForMaskedLM(BertConfig.preset(preset, num_experts=experts))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / paper - 1) < 0.03, n


def test_bad_shapes_name_the_numbers():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_heads 3"):
        BertConfig(hidden_size=100, num_heads=3)
    model = BertForMaskedLM(BertConfig.preset("tiny", max_position=16))
    with pytest.raises(ValueError, match="sequence of 20 tokens is longer than the model's 16 positions"):
        model(torch.ones(1, 20, dtype=torch.long))


def test_no_weight_decay_on_biases_norms_and_expert_biases():
    from model import adamw_warmup_linear
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1, num_experts=4))
    opt, _ = adamw_warmup_linear(model, 1e-3, 0.01, 1, 10)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    ffn = "bert.layers.0.ffn."
    assert {ffn + "w1", ffn + "w2", ffn + "router.weight", "bert.word.weight"} <= names
    assert not names & {ffn + "b1", ffn + "b2", ffn + "router.bias", "decoder_bias", "bert.ln.weight"}
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        BertConfig.preset("huge")


@pytest.mark.equations
@pytest.mark.parametrize("experts", [0, 4])
def test_taps_are_the_relation_sites_of_fig3(experts):
    cfg = BertConfig.preset("tiny", num_experts=experts, num_layers=2, vocab_size=100)
    model = BertForMaskedLM(cfg).eval()
    ids, mask = torch.randint(1, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    assert model.bert(ids, mask).taps is None
    seen = {}                                     # each module's output, recorded by hooks
    for i, layer in enumerate(model.bert.layers):
        for name in ("qkv", "attn_out", "ln1", "ffn", "ln2"):
            getattr(layer, name).register_forward_hook(
                lambda m, inp, out, key=(i, name): seen.__setitem__(key, out[0] if isinstance(out, tuple) else out))
    out = model.bert(ids, mask, taps=True)
    taps = out.taps
    assert [len(taps[k]) for k in ("trunk", "inner", "q", "k")] == [4, 4, 2, 2]
    for i in range(2):
        # trunk: after the LayerNorm of the MHA and of the FFN sublayer
        assert torch.equal(taps["trunk"][2 * i], seen[i, "ln1"]) and torch.equal(taps["trunk"][2 * i + 1], seen[i, "ln2"])
        # residual inner: the sublayer outputs before the residual connection
        assert torch.equal(taps["inner"][2 * i], seen[i, "attn_out"]) and torch.equal(taps["inner"][2 * i + 1], seen[i, "ffn"])
        q, k, _ = seen[i, "qkv"].view(2, 7, 3, 2, 64).unbind(2)                 # (B, T, nh, hs)
        assert torch.equal(taps["q"][i], q.transpose(1, 2)) and torch.equal(taps["k"][i], k.transpose(1, 2))
    assert taps["trunk"][0].shape == taps["inner"][3].shape == (2, 7, 128)
    assert torch.equal(taps["trunk"][-1], out.hidden)  # the last trunk tap is the encoder output


@pytest.mark.equations
def test_masked_head_and_loss():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.preset("tiny", num_layers=1, vocab_size=50)).eval()
    ids = torch.randint(1, 50, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5] = 7, 3
    res = model(ids, labels=labels)
    full = model(ids).logits                       # (B, T, V) without labels
    assert full.shape == (2, 6, 50)
    assert torch.allclose(res.logits, full[labels != -100], atol=1e-6)
    expected = torch.nn.functional.cross_entropy(full[labels != -100], labels[labels != -100])
    assert torch.allclose(res.loss, expected, atol=1e-6)
    assert res.balance_loss.item() == 0.0          # dense model
    none = model(ids, labels=torch.full_like(ids, -100))
    assert none.loss.item() == 0.0


@pytest.mark.equations
def test_moe_model_balance_loss_sums_layers():
    model = BertForMaskedLM(BertConfig.preset("tiny", num_experts=4, num_layers=3, vocab_size=60)).eval()
    ids = torch.randint(1, 60, (2, 9))
    x, total = model.bert.drop(model.bert.ln(model.bert.word(ids) + model.bert.position.weight[:9]
                                                   + model.bert.token_type(torch.zeros_like(ids)))), 0.0
    out = model.bert(ids)
    assert out.balance_loss.item() > 0
    for layer in model.bert.layers:
        x, b = layer(x, None, None, None)
        total += b
    assert torch.allclose(out.balance_loss, total)


def test_adapter_freezing():
    cfg = BertConfig.preset("tiny", num_experts=4, num_layers=2, vocab_size=60)
    clf = BertForSequenceClassification(cfg, num_labels=3, adapter_size=8)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    for name, _ in clf.named_parameters():
        expect = ("adapter" in name or name.endswith(("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"))
                  or name.startswith(("bert.ln.", "pooler.", "classifier.")))
        assert (name in trainable) == expect, name
    assert not any("router" in n or ".ffn.w1" in n or "qkv" in n or "word" in n for n in trainable)
    full = BertForSequenceClassification(cfg, num_labels=3)
    assert all(p.requires_grad for p in full.parameters())
    assert not any("adapter" in n for n, _ in full.named_parameters())
    # near-identity: with the same encoder weights, adapters barely change the output
    full.load_state_dict({k: v for k, v in clf.state_dict().items() if "adapter" not in k})
    full.eval(), clf.eval()
    ids = torch.randint(1, 60, (2, 5))
    assert torch.allclose(full(ids).logits, clf(ids).logits, atol=1e-3)
    out = clf(ids, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is None for n, p in clf.named_parameters() if n not in trainable)
    reg = BertForSequenceClassification(cfg, num_labels=1)
    assert reg(ids, labels=torch.tensor([0.5, 2.0])).loss.ndim == 0


@pytest.mark.equations
def test_masking_follows_bert():
    ids = torch.randint(1000, 30000, (400, 64))
    ids[:, 0], ids[:, -1], ids[:10, 30:] = 101, 102, 0
    special = torch.tensor([0, 100, 101, 102, 103])
    inputs, labels = mask_tokens(ids, special, 103, 30522, torch.Generator().manual_seed(0))
    scored = labels != -100
    candidates = ~torch.isin(ids, special)
    assert not scored[~candidates].any() and torch.equal(labels[scored], ids[scored])
    assert abs(scored.sum() / candidates.sum() - 0.15) < 0.01
    masked = (inputs == 103) & scored
    kept = (inputs == ids) & scored
    assert abs(masked.sum() / scored.sum() - 0.8) < 0.02
    assert abs(kept.sum() / scored.sum() - 0.1) < 0.02                # random ones rarely hit the original
    assert torch.equal(inputs[~scored], ids[~scored])
    again = mask_tokens(ids, special, 103, 30522, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs)
    assert not torch.equal(mask_tokens(ids, special, 103, 30522, torch.Generator().manual_seed(1))[0], inputs)


@pytest.mark.equations
def test_dropout_rate_scale_and_gradient():
    p = 0.1
    x = torch.ones(4, 256, 1024, requires_grad=True)           # 2^20 elements
    torch.manual_seed(0)
    y = dropout(x, p)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    lanes = kept.reshape(-1, 4).float().mean(0)                # each 16-bit slice of a 64-bit draw
    assert ((lanes - (1 - p)).abs() < 4 * (p * (1 - p) / (n / 4)) ** 0.5).all(), lanes
    scale = 65536 / (65536 - round(p * 65536))
    assert torch.equal(y[kept], torch.full_like(y[kept], scale))  # unbiased: E[y] = x
    y.backward(torch.arange(n, dtype=torch.float32).view_as(x))
    assert torch.equal(x.grad, torch.arange(n, dtype=torch.float32).view_as(x) * kept * scale)
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach(), p), y.detach())     # torch.manual_seed reproduces it
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x


@pytest.mark.equations
def test_attention_with_dropout_equals_written_out_attention():
    torch.manual_seed(0)
    B, nh, T, hs = 3, 2, 7, 4
    q, k, v = (torch.randn(B, nh, T, hs) for _ in range(3))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., 5:] = False                                    # padding keys
    torch.manual_seed(1)
    out = attention(q, k, v, mask, 0.25, training=True)
    torch.manual_seed(1)
    keep = dropout(torch.ones(B, nh, T, T), 0.25)               # the same draw
    scores = (q @ k.transpose(-2, -1)) / hs ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(out, (probs * keep) @ v, atol=1e-6)
    no_drop = attention(q, k, v, mask, 0.25, training=False)   # SDPA path
    assert torch.allclose(no_drop, probs @ v, atol=1e-6)


@pytest.mark.equations
def test_bf16_attention_on_cpu_matches_sdpa():
    """bf16 on the CPU takes the written-out path (faster than SDPA's flash kernel there): it must
    agree with SDPA in float32 to bf16 precision, forward and backward, padding masked."""
    torch.manual_seed(0)
    B, nh, T, hs = 2, 2, 24, 16
    q32, k32, v32 = (torch.randn(B, nh, T, hs, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., 17:] = False
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask)
    g = torch.randn_like(ref)
    ref.backward(g)
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
    out = attention(q, k, v, mask, 0.1, training=False)         # no dropout in eval
    out.backward(g.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.03)
    for ours, theirs in ((q, q32), (k, k32), (v, v32)):
        assert torch.allclose(ours.grad.float(), theirs.grad, atol=0.05)
    assert (out.float() - ref).abs().mean() < 0.005                  # not just within tolerance by luck
    k2 = k.detach().clone()
    k2[1, :, 17:] = 100.0                                            # padding keys must not matter
    out2 = attention(q.detach(), k2, v.detach(), mask, 0.0, training=False)
    assert torch.equal(out2, out.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_and_trains_in_bf16():
    import copy
    torch.manual_seed(0)
    cpu = BertForMaskedLM(BertConfig.preset("tiny", vocab_size=200, num_experts=4)).eval()
    ids = torch.randint(5, 200, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    gpu = copy.deepcopy(cpu).cuda()
    assert torch.allclose(gpu(ids.cuda(), mask.cuda()).logits.cpu(), cpu(ids, mask).logits, atol=1e-4)
    gpu.train()
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = gpu(ids.cuda(), mask.cuda(), labels=labels)
    (res.loss + res.balance_loss).backward()
    assert torch.isfinite(res.loss) and all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)
    kept = (dropout(torch.ones(1 << 20, device="cuda"), 0.1) != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.002


@pytest.mark.equations
def test_masked_lm_without_labels_or_masked_tokens():
    """Without labels: logits at every position, the balance loss and (only when asked) the taps.
    With labels but no masked position: L_MLM is exactly 0 and still backpropagates."""
    torch.manual_seed(5)
    mlm = BertForMaskedLM(BertConfig.preset("tiny", num_layers=2, num_experts=4, vocab_size=60)).eval()
    ids = torch.randint(5, 60, (2, 7))
    plain = mlm(ids)
    assert plain.logits.shape == (2, 7, 60) and plain.taps is None and plain.balance_loss > 0
    tapped = mlm(ids, taps=True)
    assert len(tapped.taps["trunk"]) == 4 and torch.equal(tapped.balance_loss, plain.balance_loss)
    none = mlm(ids, labels=torch.full_like(ids, -100))
    assert none.loss.item() == 0.0 and none.logits.shape == (0, 60)
    none.loss.backward()


def test_expert_choice_classifier_predicts_a_sentence_the_same_whatever_its_batch():
    """The evaluation rule of expert choice (per-sequence routing groups): a sentence's logits do not depend
    on its batch mates, their lengths (padding) or the batch size."""
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", num_experts=4, routing="expert_choice", vocab_size=300, dropout=0.0,
                            attention_dropout=0.0)
    model = BertForSequenceClassification(cfg, num_labels=3).eval()
    ids = torch.randint(5, 300, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        together = model(ids, mask).logits
        for b in range(3):
            n = int(mask[b].sum())
            alone = model(ids[b:b + 1, :n], mask[b:b + 1, :n]).logits
            assert torch.allclose(alone[0], together[b], atol=1e-5)
