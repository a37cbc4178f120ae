"""The iGPT model: presets, input shift and causality, objectives, hidden states, KV-cache decoding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from igpt.kernels.reference import attention_reference
from igpt.pretrain.attention import attention_backend
from igpt.pretrain.model import IGPT, IGPTConfig, KVCache
from igpt.pretrain.presets import MODEL_PRESETS, model_config


def tiny(**overrides) -> IGPTConfig:
    return IGPTConfig(**{"n_ctx": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})


def random_head(model: IGPT) -> IGPT:
    """The zero-initialised head makes every logit equal; give it weights so that logits depend on the input."""
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def tokens(batch: int = 2, seq: int = 16, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name, target", [("igpt-s", 76e6), ("igpt-m", 455e6), ("igpt-l", 1362e6), ("igpt-xl", 6.8e9)])
def test_paper_preset_parameter_counts(name, target):
    with torch.device("meta"):
        model = IGPT(model_config(name))
    assert model.cfg.n_ctx == 1024 and model.cfg.vocab_size == 512
    assert abs(model.num_params() / target - 1) < 0.01


def test_preset_shapes_and_overrides():
    assert (MODEL_PRESETS["igpt-l"]["n_embd"] // MODEL_PRESETS["igpt-l"]["n_head"]) == 96
    assert MODEL_PRESETS["igpt-xl"]["n_layer"] == 60 and MODEL_PRESETS["igpt-xl"]["n_embd"] == 3072
    assert MODEL_PRESETS["igpt-tiny"] == {"n_layer": 2, "n_embd": 64, "n_head": 4}
    cfg = model_config("igpt-mini", n_ctx=64, objective="bert")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_ctx, cfg.objective) == (4, 128, 64, "bert")
    with pytest.raises(ValueError, match="unknown model preset 'igpt-q'"):
        model_config("igpt-q")
    with pytest.raises(ValueError, match="n_layers"):
        model_config("igpt-tiny", n_layers=3)


@pytest.mark.parametrize("bad, message", [
    ({"n_embd": 30, "n_head": 4}, "not divisible"),
    ({"attn_backend": "flash"}, "attn_backend"),
    ({"objective": "mlm"}, "objective"),
    ({"norm": "batchnorm"}, "norm"),
    ({"activation": "relu"}, "activation"),
    ({"mask_prob": 0.0}, "mask_prob"),
    ({"n_layer": 0}, "n_layer"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_num_params_and_flops_formula():
    cfg = tiny()
    model = IGPT(cfg)
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_block = 12 * d * d + 13 * d
    embeddings = V * d + cfg.n_ctx * d + d
    assert model.num_params() == L * per_block + embeddings + 2 * d + V * d
    assert model.num_params(non_embedding=True) == model.num_params() - embeddings
    assert model.flops_per_token() == 6 * model.num_params(non_embedding=True) + 12 * L * cfg.n_ctx * d
    assert model.flops_per_token(seq_len=8) == 6 * model.num_params(non_embedding=True) + 12 * L * 8 * d


# ------------------------------------------------------------------------------------------- init and loss
@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_zero_head_gives_uniform_loss_at_init(objective):
    torch.manual_seed(0)
    model = IGPT(tiny(objective=objective))
    loss = model.loss(tokens(), generator=torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(math.log(512), abs=1e-6)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_gradients_reach_every_parameter(objective):
    torch.manual_seed(0)
    model = IGPT(tiny(objective=objective))
    x = tokens()
    model.loss(x, generator=torch.Generator().manual_seed(1)).backward()
    assert model.head.weight.grad.abs().sum() > 0  # only the head moves on the very first step
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad if p.grad is not None else 0
    model.zero_grad()
    model.loss(x, generator=torch.Generator().manual_seed(1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_ar_loss_is_next_pixel_cross_entropy():
    torch.manual_seed(0)
    model = random_head(IGPT(tiny()))
    x = tokens()
    logits = model(x).logits.double()
    expected = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert model.loss(x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_activation_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    plain = random_head(IGPT(tiny()))
    ckpt = IGPT(tiny(activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = tokens()
    plain.loss(x).backward()
    ckpt.loss(x).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------- causality / shift
def test_ar_shift_and_causality():
    """logits[:, t] depends on tokens < t only: changing token t leaves positions <= t alone and moves t + 1."""
    torch.manual_seed(0)
    model = random_head(IGPT(tiny()))
    x = tokens(batch=1)
    base = model(x).logits
    for t in (0, 5, 14):
        y = x.clone()
        y[0, t] = (y[0, t] + 1) % 512
        changed = model(y).logits
        torch.testing.assert_close(changed[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        assert (changed[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 512  # the last token is never an input
    torch.testing.assert_close(model(y).logits, base, rtol=0, atol=0)


def test_bert_attends_both_ways_and_hides_masked_tokens():
    torch.manual_seed(0)
    model = random_head(IGPT(tiny(objective="bert")))
    x = tokens(batch=1)
    base = model(x).logits
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 512
    assert (model(y).logits[:, :10] - base[:, :10]).abs().max() > 1e-4  # earlier positions see a later token
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 10] = True
    torch.testing.assert_close(model(y, bert_mask=mask).logits, model(x, bert_mask=mask).logits, rtol=0, atol=0)


def test_bert_loss_only_on_masked_positions():
    torch.manual_seed(0)
    model = random_head(IGPT(tiny(objective="bert", n_ctx=64)))
    x = tokens(batch=4, seq=64)
    mask = model.sample_bert_mask(x, torch.Generator().manual_seed(3))
    assert mask.dtype == torch.bool and mask.any(dim=1).all()
    logits = model(x, bert_mask=mask).logits
    expected = F.cross_entropy(logits[mask].double(), x[mask])
    loss = model.loss(x, generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    all_positions = F.cross_entropy(logits.flatten(0, 1).double(), x.flatten())
    assert abs(loss.item() - all_positions.item()) > 1e-3
    # the mask follows the generator and has the configured rate
    torch.testing.assert_close(model.sample_bert_mask(x, torch.Generator().manual_seed(3)), mask)
    big = model.sample_bert_mask(torch.zeros(64, 1024, dtype=torch.long), torch.Generator().manual_seed(0))
    assert abs(big.float().mean().item() - 0.15) < 0.01
    assert model.sample_bert_mask(torch.zeros(8, 1, dtype=torch.long)).all()  # at least one per row


# ------------------------------------------------------------------------------------------- hidden states
def test_hidden_states_are_normalised_block_inputs():
    torch.manual_seed(0)
    cfg = tiny()
    model = random_head(IGPT(cfg))
    x = tokens(batch=3)
    out = model(x, return_hidden=True)
    assert out.logits.shape == (3, 16, 512)
    assert len(out.hidden_states) == cfg.n_layer + 1
    assert all(h.shape == (3, 16, cfg.n_embd) for h in out.hidden_states)
    inputs = torch.cat([model.sos.expand(3, 1, -1), model.wte(x[:, :-1])], 1) + model.wpe.weight[:16]
    torch.testing.assert_close(out.hidden_states[0], model.blocks[0].ln_1(inputs))
    torch.testing.assert_close(model.head(out.hidden_states[-1]), out.logits)
    assert model(x).hidden_states is None


def test_features_pool_hidden_states_and_stop_early():
    torch.manual_seed(0)
    model = IGPT(tiny(n_layer=3))
    x = tokens()
    hidden = model(x, return_hidden=True).hidden_states
    feats = model.features(x, [3, 1])
    assert list(feats) == [3, 1]
    for layer, f in feats.items():
        torch.testing.assert_close(f, hidden[layer].mean(dim=1))
    calls = []
    model.blocks[1].register_forward_hook(lambda *_: calls.append(1))
    assert model.features(x, [0])[0].shape == (2, 32)
    assert model.features(x, [1])[1].shape == (2, 32)
    assert not calls, "features() ran a block past the last requested layer"
    with pytest.raises(ValueError, match="layers"):
        model.features(x, [4])


# ------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("causal", [True, False])
def test_attention_backends_agree_with_float64(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 16, generator=g) for _ in range(3))
    exact = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    for backend in ("sdpa", "reference"):
        out = attention_backend(backend)(q, k, v, causal=causal)
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    # fewer queries than keys: the queries are the last positions
    out = attention_backend("sdpa")(q[:, :, -4:], k, v, causal=causal)
    torch.testing.assert_close(out.double(), exact[:, :, -4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_sdpa_and_reference_models_agree(objective):
    torch.manual_seed(0)
    ref = random_head(IGPT(tiny(objective=objective, attn_backend="reference")))
    sdpa = IGPT(tiny(objective=objective, attn_backend="sdpa"))
    sdpa.load_state_dict(ref.state_dict())
    x = tokens()
    a, b = ref(x, return_hidden=True), sdpa(x, return_hidden=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_triton_model_matches_reference(objective):
    """Tiny shape: under TRITON_INTERPRET=1 the kernel runs in numpy."""
    torch.manual_seed(0)
    cfg = dict(n_ctx=8, n_layer=1, n_head=2, n_embd=32, objective=objective)
    ref = random_head(IGPT(IGPTConfig(**cfg, attn_backend="reference")))
    tri = IGPT(IGPTConfig(**cfg, attn_backend="triton"))
    tri.load_state_dict(ref.state_dict())
    x = tokens(batch=1, seq=7)  # not a multiple of any block size
    gen = torch.Generator().manual_seed(1)
    loss_ref = ref.loss(x, generator=torch.Generator().manual_seed(1))
    loss_tri = tri.loss(x, generator=gen)
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-4, atol=1e-5)
    loss_ref.backward()
    loss_tri.backward()
    for (name, a), b in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_kv_cache_decoding_equals_full_forward(backend):
    torch.manual_seed(0)
    model = random_head(IGPT(tiny(attn_backend=backend)))
    x = tokens(batch=2)
    full = model(x).logits
    cache = KVCache(model.cfg.n_layer, 16)
    steps = [model.decode(x, cache, 6)]  # prefill positions 0..5 in one call
    steps += [model.decode(x, cache, end) for end in (7, 8)]
    steps.append(model.decode(x, cache, 11))  # a chunk of 3 after the prefix
    steps += [model.decode(x, cache, end) for end in range(12, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot decode"):
        model.decode(x, cache, 17)


def test_greedy_generation_follows_full_forward_argmax():
    torch.manual_seed(0)
    model = random_head(IGPT(tiny()))
    out = model.generate(batch_size=3, temperature=0)
    assert out.shape == (3, 16) and out.dtype == torch.long
    torch.testing.assert_close(model(out).logits.argmax(-1), out)


def test_generation_with_prefix_and_sampling_options():
    torch.manual_seed(0)
    model = random_head(IGPT(tiny()))
    prefix = tokens(batch=2, seq=8)
    a = model.generate(prefix=prefix, top_k=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prefix=prefix, top_k=5, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 16)
    torch.testing.assert_close(a[:, :8], prefix)
    torch.testing.assert_close(a, b)
    top5 = model(a).logits.topk(5, dim=-1).indices[:, 8:]
    assert (top5 == a[:, 8:, None]).any(-1).all(), "sampled a token outside the top k"
    assert model.generate(prefix=prefix, n_tokens=8).equal(prefix)
    assert model.generate(batch_size=4, n_tokens=5).shape == (4, 5)
    with pytest.raises(ValueError, match="batch_size"):
        model.generate(batch_size=3, prefix=prefix)
    with pytest.raises(ValueError, match="n_tokens"):
        model.generate(batch_size=1, n_tokens=17)
    with pytest.raises(ValueError, match="objective='ar'"):
        IGPT(tiny(objective="bert")).generate(batch_size=1)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_problem():
    model = IGPT(tiny())
    with pytest.raises(ValueError, match="context is 16"):
        model(tokens(seq=17))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model(torch.full((1, 4), 512))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="bert_mask"):
        model(tokens(), bert_mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        IGPT(tiny(objective="bert"))(tokens(), bert_mask=torch.zeros(2, 15, dtype=torch.bool))
