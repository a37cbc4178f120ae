"""The patch model (``igpt.pretrain.patch_model``): causality in raster and random order, patches against a plain
reference, sampling with the KV cache against sampling without, the random orders of the loader and the one-line
errors of configs it cannot run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igpt.data_pipeline.loader import TokenStream
from igpt.data_pipeline.manifest import Manifest
from igpt.errors import UserError
from igpt.pretrain.config import ConfigError, TrainConfig, load_config
from igpt.pretrain.hf_convert import NotConvertible, check_exportable
from igpt.pretrain.metrics import MetricsWindow, StepRecord
from igpt.pretrain.model import IGPTConfig, _sample
from igpt.pretrain.models import build_model
from igpt.pretrain.patch_model import PatchGPT
from igpt.pretrain.train import resolve_model_section

V, P, G = 16, 2, 4  # vocabulary, patch side, patches per side: 8x8 images of 16 patches
PALETTE = np.random.default_rng(0).integers(0, 256, (V, 3)).astype(np.uint8)


def patch_model(target: str = "tokens", order: str = "raster", seed: int = 0) -> PatchGPT:
    """A tiny patch model with random (non-zero) weights everywhere, the head included."""
    cfg = IGPTConfig(vocab_size=V, n_ctx=G * G, n_layer=2, n_head=2, n_embd=32, unit="patch", patch_size=P,
                     target=target, order=order)
    torch.manual_seed(seed)
    model = build_model(cfg, PALETTE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, (G * P) ** 2), generator=torch.Generator().manual_seed(seed))


def test_patches_are_squares_of_the_grid_in_raster_order():
    model, x = patch_model(), tokens()
    grid = x.view(-1, G * P, G * P)
    patches = model.patchify(x)
    for n in range(G * G):
        r, c = divmod(n, G)
        assert torch.equal(patches[:, n], grid[:, r * P:(r + 1) * P, c * P:(c + 1) * P].reshape(-1, P * P))
    assert torch.equal(model.unpatchify(patches), x)


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_loss_matches_a_plain_computation(target):
    """Raster order: the input at t is patch t-1's colours in [-1, 1] (the start vector at 0) plus the position
    of patch t; the loss is p² softmaxes (nats per token) or the MSE of per-patch normalised colours."""
    model, x = patch_model(target), tokens()
    patches = model.patchify(x)
    rgb = torch.as_tensor(PALETTE, dtype=torch.float32)[patches] / 127.5 - 1  # (B, N, p², 3)
    emb = model.patch_embed(rgb.flatten(2))
    h = torch.cat([model.sos.expand(len(x), 1, -1), emb[:, :-1]], 1) + model.wpe.weight
    for block in model.blocks:
        h, _ = block(h)
    out = model.head(model.ln_f(h))
    if target == "tokens":
        want = F.cross_entropy(out.view(-1, V), patches.flatten())
    else:
        flat = rgb.flatten(2)
        norm = (flat - flat.mean(-1, keepdim=True)) / (flat.var(-1, keepdim=True) + 1e-6).sqrt()
        want = F.mse_loss(out, norm)
    torch.testing.assert_close(model.loss(x), want)


@pytest.mark.parametrize("order", ["raster", "random"])
def test_a_patch_target_gets_no_gradient_from_its_own_or_later_inputs(order):
    """The loss of the patch predicted at position t reaches the inputs of the patches before it in the order
    (embedding slots 0..t-1, slot j holding patch order[j]) and none of the others."""
    model = patch_model(order=order).train()
    x = tokens(2)
    perm = torch.randperm(G * G, generator=torch.Generator().manual_seed(5))
    seq_order = perm.expand(2, -1) if order == "random" else None
    kept = {}
    model.patch_embed.register_forward_hook(lambda m, i, out: kept.update(emb=out) or out.retain_grad())
    for t in (1, 7, G * G - 1):
        model.zero_grad()
        losses = model.position_losses(x, seq_order)
        losses[:, t].sum().backward()
        grad = kept["emb"].grad.abs().sum(-1)  # (B, N - 1): slot j is the input at position j + 1
        assert (grad[:, t:] == 0).all(), (order, t)
        assert (grad[:, :t] > 0).all(), (order, t)
        if model.wpe_input is not None:  # the input-position table: the rows of the patches before t only
            used = model.wpe_input.weight.grad.abs().sum(-1) > 0
            assert set(used.nonzero().flatten().tolist()) == set(perm[:t].tolist())


def test_random_order_predicts_the_patch_it_is_told():
    """Position t predicts patch order[t]: the first position's loss is that of the start vector with the
    target position order[0] alone, whichever patch that is."""
    model, x = patch_model(order="random"), tokens(1)
    for first in (0, 5, 11):
        order = torch.tensor([[first, *[n for n in range(G * G) if n != first]]])
        want = model.output_losses(model(x, order=order).logits, x, order)[0, 0]
        logits = model.head(model.ln_f(_start_only(model, first)))[None, None].view(1, 1, P * P, V)
        alone = F.cross_entropy(logits.view(-1, V), model.patchify(x)[0, first])
        torch.testing.assert_close(want, alone)


def _start_only(model: PatchGPT, target: int) -> torch.Tensor:
    """The last hidden state of a one-position sequence: the start vector with the target position ``target``."""
    h = (model.sos + model.wpe.weight[target])[None, None]
    for block in model.blocks:
        h, _ = block(h)
    return h[0, 0]


def test_sampling_with_the_kv_cache_equals_sampling_without():
    """A patch per step: each step's p² tokens drawn from the full forward's logits of that patch, with the same
    generator, give the images ``generate`` gives with its cache; a prefix's pixels are kept."""
    model = patch_model()
    prefix = tokens(2, seed=3)[:, : 8 * P + 3]  # two patch rows and three pixels of the next
    got = model.generate(prefix=prefix, temperature=1.0, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    grid = torch.zeros(2, (G * P) ** 2, dtype=torch.long)
    grid[:, : prefix.shape[1]] = prefix
    known = model.patchify(torch.arange((G * P) ** 2)[None] < prefix.shape[1]).bool()[0]
    with torch.no_grad():
        for t in range(G, G * G):  # the first G patches are whole in the prefix
            logits = model(grid).logits[:, t]
            drawn = _sample(logits.flatten(0, 1), 1.0, None, gen).view(2, -1)
            seq = model.patchify(grid)
            seq[:, t] = torch.where(known[t], seq[:, t], drawn)
            grid = model.unpatchify(seq)
    assert torch.equal(got, grid)
    assert torch.equal(got[:, : prefix.shape[1]], prefix)


def test_random_orders_travel_with_the_batch_and_do_not_depend_on_the_layout(cifar_tokens):
    """A sample's order is drawn from (seed, epoch, shard, position): the same with 0 or 2 workers and any
    batch size, a permutation, and different between samples and epochs."""
    def orders(workers: int, batch: int, epochs: int = 2) -> dict[tuple[int, str], list[int]]:
        stream = TokenStream(cifar_tokens, "val", batch, num_workers=workers, seed=3, with_keys=True, patch_orders=16)
        out = {}
        for epoch in range(epochs):
            for b in stream.iter_epoch():
                assert b["order"].shape == (len(b["keys"]), 16) and b["order"].dtype == torch.long
                out.update({(epoch, k): o.tolist() for k, o in zip(b["keys"], b["order"])})
        return out

    a, b = orders(0, 7), orders(2, 32)
    assert a == b
    assert all(sorted(o) == list(range(16)) for o in a.values())
    keys = sorted({k for _, k in a})
    assert len({tuple(a[0, k]) for k in keys}) > len(keys) * 0.9
    assert sum(a[0, k] != a[1, k] for k in keys) > len(keys) * 0.9
    assert "order" not in next(iter(TokenStream(cifar_tokens, "val", 4, num_workers=0)))


def test_bad_patch_configs_are_one_line_errors(cifar_tokens):
    with pytest.raises(ConfigError, match="objective='bert' is not supported with unit='patch'"):
        load_config(None, ["data.dir=x", "model.unit=patch", "model.objective=bert"])
    with pytest.raises(ConfigError, match="need unit='patch'"):
        load_config(None, ["data.dir=x", "model.order=random"])
    cfg = load_config(None, [f"data.dir={cifar_tokens}", "model.unit=patch", "model.patch_size=3"])
    with pytest.raises(ConfigError, match="'model.patch_size' = 3 does not divide the resolution 16"):
        resolve_model_section(cfg, Manifest.load(cifar_tokens))
    cfg = load_config(None, [f"data.dir={cifar_tokens}", "model.unit=patch", "model.patch_size=4"])
    resolve_model_section(cfg, Manifest.load(cifar_tokens))
    assert cfg.model.n_ctx == 16 and cfg.tokens_per_step() == 8 * 16 and cfg.pixels_per_step() == 8 * 256
    with pytest.raises(NotConvertible, match="only pixel models export to Hugging Face"):
        check_exportable(IGPTConfig(unit="patch", norm="rms"))
    with pytest.raises(UserError, match="sampling needs model.target='tokens'"):
        patch_model("pixels").generate(1)
    assert isinstance(TrainConfig().model, IGPTConfig)


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_a_pixels_targets_loss_is_shown_and_tracked_as_an_mse_not_in_bits(target):
    cfg = IGPTConfig(n_ctx=4, n_layer=1, n_head=2, n_embd=8, unit="patch", patch_size=2, target=target)
    window = MetricsWindow(1.0, 1, 1.0, total_steps=2, likelihood=cfg.likelihood)
    window.add_step(StepRecord(1, 1e-3, 0.5, False, 1.0, False), tokens=4, pixels=16)
    window.add_seconds(1.0)
    metrics, line = window.close(StepRecord(1, 1e-3, 0.5, False, 1.0, False), tokens_seen=4, nonfinite_total=0,
                                 memory_gb=0.0)
    if target == "tokens":
        assert metrics["bpp"] == pytest.approx(0.5 / np.log(2)) and f"({0.5 / np.log(2):.3f} bpp)" in line
    else:
        assert "bpp" not in metrics and "bpp" not in line and "loss 0.5000 (MSE)" in line
