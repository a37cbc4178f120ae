"""The patch model: an autoregressive ViT over p x p patches of the palette-token grid, beside pixel iGPT.

It takes the same (B, R²) token grids as ``IGPT`` and patchifies inside: patch n is the p x p square at patch
row n // G, column n % G (G = R / p), its pixels in raster order. One sequence position is one patch, so the
context ``n_ctx`` is G² patches. A patch's input is its p²·3 palette colours scaled to [-1, 1] (``palette``, a
uint8 buffer, so checkpoints and releases carry the palette) and linearly projected (ViT's patch embedding).

Order and shift: the sequence visits the patches in ``order`` (B, G²), raster (``arange``) unless given. As in
the pixel model the input at position t is patch ``order[t-1]`` (a learned start vector at t = 0) and
``wpe[order[t]]``, the position of the patch to predict, is added at t, so ``logits[:, t]`` predicts patch
``order[t]``. With ``order: random`` the position the input patch comes from is added too (``wpe_input``), as in
sigma-GPT (Pannatier et al. 2024); in raster order it follows from t and is left out.

Targets: ``tokens``, the next patch's p² palette tokens with p² independent softmaxes (loss in nats per token,
so bits per pixel compare with the pixel model), or ``pixels``, its p²·3 colours normalised by the patch's own
mean and variance, regressed with the mean squared error (AIM, El-Nouby et al. 2024).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from igpt.errors import UserError
from igpt.pretrain.model import (Block, IGPTConfig, IGPTOutput, KVCache, TransformerBody, _sample, make_norm,
                                 sampling_prefix)

PIXEL_NORM_EPS = 1e-6  # the per-patch variance's epsilon of the pixels target (MAE's and AIM's)


class PatchGPT(TransformerBody):
    """The patch model of ``cfg`` (``cfg.unit == "patch"``); ``n_ctx`` is the number of patches per image."""

    def __init__(self, cfg: IGPTConfig) -> None:
        super().__init__()
        if cfg.n_ctx is None or cfg.vocab_size is None:
            raise UserError("IGPTConfig.n_ctx and vocab_size must be set (a training run takes them from its data)")
        grid = math.isqrt(cfg.n_ctx)
        if grid * grid != cfg.n_ctx or cfg.objective != "ar":
            raise UserError(f"a patch model needs a square number of patches and objective='ar', got "
                            f"n_ctx={cfg.n_ctx}, objective={cfg.objective!r}")
        self.cfg, self.p, self.grid = cfg, cfg.patch_size, grid
        self.side = grid * cfg.patch_size  # the image's side in pixels
        pixels = self.p * self.p
        self.register_buffer("palette", torch.zeros(cfg.vocab_size, 3, dtype=torch.uint8))
        self.patch_embed = nn.Linear(3 * pixels, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)  # where the patch to predict sits
        self.wpe_input = nn.Embedding(cfg.n_ctx, cfg.n_embd) if cfg.order == "random" else None
        self.sos = nn.Parameter(torch.empty(cfg.n_embd))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        outputs = pixels * (cfg.vocab_size if cfg.target == "tokens" else 3)
        self.head = nn.Linear(cfg.n_embd, outputs, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The pixel model's GPT-2 initialisation (zero head); the palette buffer is left as it is."""
        std = self.cfg.init_std
        self._init_body()
        for table in (self.wpe, self.wpe_input):
            if table is not None:
                nn.init.normal_(table.weight, std=std / 2)
        nn.init.normal_(self.sos, std=std)
        nn.init.zeros_(self.head.weight)

    def set_palette(self, palette: np.ndarray) -> None:
        """Carry the (K, 3) uint8 palette of the token shards (K <= vocab_size)."""
        if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) > self.cfg.vocab_size:
            raise UserError(f"palette of shape {palette.shape} does not fit a vocabulary of {self.cfg.vocab_size}")
        with torch.no_grad():
            self.palette.zero_()
            self.palette[: len(palette)] = torch.as_tensor(np.asarray(palette, np.uint8), device=self.palette.device)

    # ---------------------------------------------------------------- patches
    def patchify(self, tokens: Tensor) -> Tensor:
        """(B, R²) token grids → (B, G², p²) patches in raster order, pixels in raster order inside."""
        self._check_tokens(tokens)
        B, G, p = tokens.shape[0], self.grid, self.p
        return tokens.view(B, G, p, G, p).permute(0, 1, 3, 2, 4).reshape(B, G * G, p * p)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """The inverse of ``patchify``."""
        B, G, p = patches.shape[0], self.grid, self.p
        return patches.view(B, G, G, p, p).permute(0, 1, 3, 2, 4).reshape(B, self.side * self.side)

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.side ** 2 or tokens.dtype.is_floating_point:
            raise UserError(f"a patch model of {self.side}x{self.side} images takes integer tokens (batch, "
                            f"{self.side ** 2}), got {tuple(tokens.shape)} {tokens.dtype}")
        self._check_token_range(tokens)

    def _sequence(self, tokens: Tensor, order: Tensor | None) -> tuple[Tensor, Tensor]:
        """(the order (B, G²), raster when None; the patches (B, G², p²) of ``tokens`` visited in it)."""
        order = self._order(tokens, order)
        return order, self.patchify(tokens).gather(1, order[..., None].expand(-1, -1, self.p * self.p))

    def _order(self, tokens: Tensor, order: Tensor | None) -> Tensor:
        n = self.cfg.n_ctx
        if order is None:
            return torch.arange(n, device=tokens.device).expand(tokens.shape[0], n)
        if order.shape != (tokens.shape[0], n) or order.dtype.is_floating_point:
            raise UserError(f"order must be an integer tensor (batch, {n}), got {tuple(order.shape)} {order.dtype}")
        return order.to(tokens.device)

    def colours(self, patches: Tensor) -> Tensor:
        """(..., p²) tokens → (..., p²·3) palette colours in [-1, 1]."""
        return (self.palette[patches].float() / 127.5 - 1.0).flatten(-2)

    def _inputs(self, seq: Tensor, order: Tensor, start: int, end: int) -> Tensor:
        """Inputs at positions [start, end) of a sequence ``seq`` (B, G², p²) in ``order``: the start vector at 0,
        else patch t-1's embedding (with its position in random order), plus the position to predict."""
        dtype = self.patch_embed.weight.dtype
        parts = []
        if start == 0:
            parts.append(self.sos.to(dtype).expand(seq.shape[0], 1, -1))
        before = slice(max(start - 1, 0), end - 1)
        x = self.patch_embed(self.colours(seq[:, before]).to(dtype))
        if self.wpe_input is not None:
            x = x + self.wpe_input(order[:, before])
        parts.append(x)
        return torch.cat(parts, dim=1) + self.wpe(order[:, start:end])

    def _head(self, x: Tensor) -> Tensor:
        out = self.head(x)
        if self.cfg.target == "tokens":
            return out.view(*x.shape[:-1], self.p * self.p, self.cfg.vocab_size)
        return out

    # ---------------------------------------------------------------- training
    def forward(self, tokens: Tensor, *, order: Tensor | None = None, return_hidden: bool = False) -> IGPTOutput:
        """Predictions where position t is for patch ``order[t]`` (raster by default): logits (B, G², p², V) for
        the ``tokens`` target, normalised colours (B, G², p²·3) for ``pixels``; with ``return_hidden`` also the
        ln_1 outputs of every block and the ln_f output (n_layer + 1 tensors (B, G², D))."""
        return self._predict(*self._sequence(tokens, order), return_hidden)

    def _predict(self, order: Tensor, seq: Tensor, return_hidden: bool = False) -> IGPTOutput:
        """``forward`` on the patches ``seq`` (B, G², p²) already in ``order``."""
        x = self._inputs(seq, order, 0, self.cfg.n_ctx)
        hidden = []
        for block in self.blocks:
            x, h = self._run_block(block, x)
            if return_hidden:
                hidden.append(h)
        x = self.ln_f(x)
        if return_hidden:
            hidden.append(x)
        return IGPTOutput(self._head(x), tuple(hidden) if return_hidden else None)

    def targets(self, tokens: Tensor, order: Tensor | None = None) -> Tensor:
        """What ``forward`` predicts, position by position: the patches' tokens (B, G², p²), or their colours
        normalised per patch (B, G², p²·3)."""
        return self._targets(self._sequence(tokens, order)[1])

    def _targets(self, seq: Tensor) -> Tensor:
        if self.cfg.target == "tokens":
            return seq
        rgb = self.colours(seq)
        mean, var = rgb.mean(-1, keepdim=True), rgb.var(-1, keepdim=True)
        return (rgb - mean) / (var + PIXEL_NORM_EPS).sqrt()

    def position_losses(self, tokens: Tensor, order: Tensor | None = None) -> Tensor:
        """(B, G²) loss of each position: mean nats per token of the patch (``tokens``), or its MSE (``pixels``)."""
        order, seq = self._sequence(tokens, order)  # once, for the inputs and the targets alike
        return self._losses(self._predict(order, seq).logits, self._targets(seq))

    def output_losses(self, pred: Tensor, tokens: Tensor, order: Tensor | None = None) -> Tensor:
        """``position_losses`` of predictions ``pred`` that ``forward`` made for ``tokens`` in ``order``."""
        return self._losses(pred, self.targets(tokens, order))

    def _losses(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = pred.float()
        if self.cfg.target == "tokens":
            return F.cross_entropy(pred.flatten(0, 2), target.flatten(), reduction="none").view(target.shape).mean(-1)
        return (pred - target).pow(2).mean(-1)

    def loss(self, tokens: Tensor, generator: torch.Generator | None = None, order: Tensor | None = None) -> Tensor:
        """Mean nats per token (``tokens`` target) or mean squared error (``pixels``) over every patch, the
        sequence visiting the patches in ``order`` (raster by default); ``generator`` is unused (no masks)."""
        return self.position_losses(tokens, order).mean()

    # ---------------------------------------------------------------- probes
    def features(self, tokens: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """Average-pooled hidden states {layer: (B, D)} in raster order with the causal mask (see ``forward``)."""
        self._check_layers(layers)
        x = self._inputs(self.patchify(tokens), self._order(tokens, None), 0, self.cfg.n_ctx)
        return self._pooled(x, layers)

    # ---------------------------------------------------------------- sampling
    def decode(self, seq: Tensor, cache: KVCache, end: int) -> Tensor:
        """Logits (B, end - cache.length, p², V) for raster positions [cache.length, end), extending the cache;
        ``seq`` (B, G², p²) holds the patches so far (position t sees patch t-1)."""
        start = cache.length
        if not start < end <= min(cache.max_len, self.cfg.n_ctx):
            raise UserError(f"cannot decode positions [{start}, {end}) with a cache of {cache.max_len}")
        order = torch.arange(self.cfg.n_ctx, device=seq.device).expand(seq.shape[0], -1)
        return self._head(self._decode_hidden(self._inputs(seq, order, start, end), cache))

    @torch.no_grad()
    def generate(
        self,
        batch_size: int | None = None,
        prefix: Tensor | None = None,
        *,
        n_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample (B, n_tokens) tokens (default R², always whole rows of patches) a patch per step in raster order
        with a KV cache, continuing the pixels ``prefix`` (B, P) if given: a patch the prefix covers in part is
        sampled and its prefix pixels kept (the p² softmaxes are independent). As ``IGPT.generate`` otherwise."""
        if not self.cfg.likelihood:
            raise UserError("sampling needs model.target='tokens'; a model trained with target='pixels' regresses "
                            "normalised colours and has no distribution to sample from")
        row = self.p * self.side  # pixels in a row of patches
        n_tokens = self.side ** 2 if n_tokens is None else n_tokens
        if not 1 <= n_tokens <= self.side ** 2 or n_tokens % row:
            raise UserError(f"a patch model samples whole rows of patches: n_tokens must be a multiple of {row} "
                            f"up to {self.side ** 2}, got {n_tokens}")
        device = self.palette.device
        prefix = sampling_prefix(prefix, batch_size, n_tokens, temperature, top_k, device)
        B, P = prefix.shape
        grid = torch.zeros(B, self.side ** 2, dtype=torch.long, device=device)
        grid[:, :P] = prefix
        known = torch.zeros(1, self.side ** 2, dtype=torch.bool, device=device)
        known[:, :P] = True
        seq, known = self.patchify(grid), self.patchify(known.long()).bool()[0]
        patches = n_tokens // (self.p * self.p)
        first = int(known.all(-1).long().cumprod(0).sum())  # leading patches the prefix gives whole
        cache = KVCache(self.cfg.n_layer, patches)
        for t in range(min(first, patches - 1), patches):
            logits = self.decode(seq, cache, t + 1)[:, -1]
            drawn = _sample(logits.flatten(0, 1), temperature, top_k, generator).view(B, -1)
            seq[:, t] = torch.where(known[t], seq[:, t], drawn)
        return self.unpatchify(seq)[:, :n_tokens]

    # ---------------------------------------------------------------- accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the position tables and the start vector (the patch
        embedding is a matmul and counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(t.weight.numel() for t in (self.wpe, self.wpe_input) if t is not None) + self.cfg.n_embd
        return n
