"""The iGPT model (Chen et al. 2020): a pre-norm GPT over palette tokens, one token per pixel.

Inputs are shifted right behind a learned start-of-sequence (SOS) vector for the autoregressive
objective: the input at position t is the embedding of token t-1 (the SOS vector at t = 0), so
``logits[:, t]`` predicts token t. The BERT objective does not shift: the input at position t is
token t, or a learned mask embedding where masked, attention is bidirectional and ``logits[:, t]``
again predicts token t. The output head is untied and starts at zero (loss ln V at init).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from igpt.errors import UserError
from igpt.pretrain.attention import AttnBackend, attention_backend

Objective = Literal["ar", "bert"]
Norm = Literal["layernorm", "rms"]
Activation = Literal["gelu_tanh", "quick_gelu"]
Unit = Literal["pixel", "patch"]
Target = Literal["tokens", "pixels"]
Order = Literal["raster", "random"]
NORM_EPS = 1e-5  # every norm's epsilon (nn.LayerNorm's default and Hugging Face ImageGPT's layer_norm_epsilon)


@dataclass
class IGPTConfig:
    """Model hyper-parameters; the defaults are iGPT-S at 32x32 resolution. A training config's ``model``
    section is this class (plus the preset it starts from, ``igpt.pretrain.config.ModelSection``)."""

    vocab_size: int = 512
    """Palette size: tokens are palette indices (training takes it from the token shards when unset)."""
    n_ctx: int = 1024
    """Context: pixels per image, resolution² (training takes it from the token shards when unset)."""
    n_layer: int = 24
    """Transformer blocks."""
    n_head: int = 8
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 512
    """Width of the residual stream."""
    attn_backend: AttnBackend = "sdpa"
    """Attention implementation (``igpt.pretrain.attention``): auto (the fastest measured, SDPA on a CPU), sdpa,
    sdpa_cudnn, sdpa_flash, triton (our kernel) or reference."""
    objective: Objective = "ar"
    """``ar``: next-pixel prediction behind a start token; ``bert``: masked-pixel prediction."""
    mask_prob: float = 0.15
    """BERT objective: the probability that a pixel is masked."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (memory for time)."""
    init_std: float = 0.02
    """Standard deviation of the GPT-2 initialisation."""
    norm: Norm = "layernorm"
    """``layernorm``: mean-centred, with a bias; ``rms``: ``x / sqrt(mean(x²) + eps) * weight``, no bias (OpenAI's
    iGPT and Hugging Face ImageGPT; only ``rms`` models export to Hugging Face)."""
    activation: Activation = "gelu_tanh"
    """MLP activation: ``gelu_tanh`` (GELU, tanh approximation) or ``quick_gelu`` (``x * sigmoid(1.702 x)``,
    OpenAI's iGPT)."""
    unit: Unit = "pixel"
    """What one sequence position is: ``pixel`` (iGPT, this class) or ``patch``, a ``patch_size``² square of pixels
    (a ViT patch embedding of its palette colours, ``igpt.pretrain.patch_model.PatchGPT``)."""
    patch_size: int = 4
    """Patch side in pixels (``unit: patch``); must divide the resolution. ``n_ctx`` then counts patches."""
    target: Target = "tokens"
    """What a patch model predicts of the next patch: ``tokens``, its patch_size² palette tokens (one softmax per
    pixel, so nats per token compare with the pixel model), or ``pixels``, its colours normalised per patch (MSE, AIM)."""
    order: Order = "raster"
    """The order a patch model is trained in: ``raster``, or ``random``, a permutation per sample drawn by the
    loader, with the position of the patch to predict given to the model (sigma-GPT)."""

    @property
    def likelihood(self) -> bool:
        """Whether the loss is a likelihood in nats per token (every model but a ``pixels`` target's MSE)."""
        return self.unit == "pixel" or self.target == "tokens"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value is None and name in ("vocab_size", "n_ctx"):
                continue  # unresolved: a training run fills it from its token shards
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"IGPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"IGPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name, kind in (("attn_backend", AttnBackend), ("objective", Objective), ("norm", Norm),
                           ("activation", Activation)):
            if getattr(self, name) not in get_args(kind):
                raise UserError(f"IGPTConfig.{name}={getattr(self, name)!r}; choose one of {get_args(kind)}")
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"IGPTConfig.mask_prob must be in (0, 1), got {self.mask_prob!r}")
        if not self.init_std > 0.0:
            raise UserError(f"IGPTConfig.init_std must be positive, got {self.init_std!r}")
        for name, kind in (("unit", Unit), ("target", Target), ("order", Order)):
            if getattr(self, name) not in get_args(kind):
                raise UserError(f"IGPTConfig.{name}={getattr(self, name)!r}; choose one of {get_args(kind)}")
        if not isinstance(self.patch_size, int) or isinstance(self.patch_size, bool) or self.patch_size < 1:
            raise UserError(f"IGPTConfig.patch_size must be a positive int, got {self.patch_size!r}")
        if self.unit == "pixel" and (self.target, self.order) != ("tokens", "raster"):
            raise UserError(f"IGPTConfig: target={self.target!r} and order={self.order!r} need unit='patch' (a pixel "
                             "model predicts tokens in raster order)")
        if self.unit == "patch" and self.objective == "bert":
            raise UserError("IGPTConfig: objective='bert' is not supported with unit='patch'; use objective='ar'")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class IGPTOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab_size)
    hidden_states: tuple[Tensor, ...] | None  # n_layer + 1 tensors (B, T, n_embd) when requested


class KVCache:
    """Keys and values of every layer for incremental decoding; ``length`` positions are filled."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self._k: list[Tensor | None] = [None] * n_layer
        self._v: list[Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, H, T, D) keys/values after the filled positions; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[-2]
        if end > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} positions; cannot extend {start} by {k.shape[-2]}")
        if self._k[layer] is None:
            shape = (*k.shape[:-2], self.max_len, k.shape[-1])
            self._k[layer], self._v[layer] = k.new_empty(shape), v.new_empty(shape)
        cache_k, cache_v = self._k[layer], self._v[layer]
        cache_k[..., start:end, :] = k
        cache_v[..., start:end, :] = v
        return cache_k[..., :end, :], cache_v[..., :end, :]

    def advance(self, n: int) -> None:
        self.length += n


class SelfAttention(nn.Module):
    def __init__(self, cfg: IGPTConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.attend = layer, cfg.n_head, attention_backend(cfg.attn_backend)
        self.causal = cfg.objective == "ar"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self.attend(q, k, v, causal=self.causal)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)``: the GELU approximation of OpenAI's iGPT."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "quick_gelu": quick_gelu}


def make_norm(cfg: IGPTConfig) -> nn.Module:
    """The normalisation layer ``cfg.norm`` names, over ``n_embd`` features."""
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(cfg.n_embd, eps=NORM_EPS)


class MLP(nn.Module):
    def __init__(self, cfg: IGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block; returns the new residual stream and its normalised input (ln_1 output)."""

    def __init__(self, cfg: IGPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = SelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        h = self.ln_1(x)
        x = x + self.attn(h, cache)
        x = x + self.mlp(self.ln_2(x))
        return x, h


class TransformerBody(nn.Module):
    """What the pixel and the patch model share around their ``blocks`` and ``ln_f``: the initialisation of the
    linear layers and norms, activation checkpointing, pooled features and the FLOP count."""

    cfg: IGPTConfig
    blocks: nn.ModuleList
    ln_f: nn.Module

    def _init_body(self) -> None:
        """GPT-2 initialisation of every linear layer and norm: N(0, std) weights, residual projections scaled
        by 1/sqrt(2 n_layer), zero biases."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj") else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def _check_token_range(self, tokens: Tensor, name: str = "tokens") -> None:
        """Refuse a token outside the vocabulary, on CPU only: on a GPU it would cost two host syncs per step (and
        a graph break under torch.compile); there an out-of-range token trips the embedding's device assert."""
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling() and tokens.numel() and (
                int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise UserError(f"{name} must lie in [0, {self.cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")

    def _decode_hidden(self, x: Tensor, cache: KVCache) -> Tensor:
        """The final normalised hidden states of the new positions' inputs ``x`` (B, T, D) through every block,
        attending to (and extending) ``cache``, which then advances by T."""
        for block in self.blocks:
            x, _ = block(x, cache)
        cache.advance(x.shape[1])
        return self.ln_f(x)

    def _run_block(self, block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _pooled(self, x: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """Average-pooled hidden states {layer: (B, D)} of the inputs ``x`` (see ``forward``), running only the
        blocks needed."""
        wanted = list(dict.fromkeys(int(layer) for layer in layers))
        pooled: dict[int, Tensor] = {}
        last = max(wanted)
        for i, block in enumerate(self.blocks):
            if i == last:
                pooled[i] = block.ln_1(x).mean(dim=1)
                break
            x, h = block(x)
            if i in wanted:
                pooled[i] = h.mean(dim=1)
        else:
            pooled[self.cfg.n_layer] = self.ln_f(x).mean(dim=1)
        return {layer: pooled[layer] for layer in wanted}

    def _check_layers(self, layers: Sequence[int]) -> None:
        if not layers or any(not 0 <= int(layer) <= self.cfg.n_layer for layer in layers):
            raise UserError(f"layers must be a non-empty list of ints in [0, {self.cfg.n_layer}], got {list(layers)}")

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token (sequence position), PaLM appendix B: 6 N + 12 L T d.

        N is the non-embedding parameter count (every matmul weight, the head included), L the
        layers, T the sequence length (default n_ctx) and d the width; the attention term counts
        the full T x T score matrix (no causal discount), as PaLM does, so MFU stays comparable."""
        T = self.cfg.n_ctx if seq_len is None else seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * self.cfg.n_layer * T * self.cfg.n_embd


class IGPT(TransformerBody):
    def __init__(self, cfg: IGPTConfig) -> None:
        super().__init__()
        if cfg.n_ctx is None or cfg.vocab_size is None:
            raise UserError("IGPTConfig.n_ctx and vocab_size must be set (a training run takes them from its data)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        # the AR objective starts from a learned SOS vector, the BERT objective replaces masked inputs by one
        self.sos = nn.Parameter(torch.empty(cfg.n_embd)) if cfg.objective == "ar" else None
        self.mask_emb = nn.Parameter(torch.empty(cfg.n_embd)) if cfg.objective == "bert" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, std) weights, residual projections scaled by 1/sqrt(2 n_layer), zero head."""
        std = self.cfg.init_std
        self._init_body()
        nn.init.normal_(self.wte.weight, std=std)
        nn.init.normal_(self.wpe.weight, std=std / 2)
        for vector in (self.sos, self.mask_emb):
            if vector is not None:
                nn.init.normal_(vector, std=std)
        nn.init.zeros_(self.head.weight)

    # ---------------------------------------------------------------- inputs
    def _check_tokens(self, tokens: Tensor, name: str = "tokens") -> None:
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise UserError(f"{name} must be an integer tensor (batch, seq), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise UserError(f"{name} has {tokens.shape[1]} positions; the model's context is {self.cfg.n_ctx}")
        self._check_token_range(tokens, name)

    def _ar_inputs(self, tokens: Tensor, start: int, end: int) -> Tensor:
        """Inputs at positions [start, end): the SOS vector at 0, else the embedding of token p-1."""
        parts = []
        if start == 0:
            parts.append(self.sos.to(self.wte.weight.dtype).expand(tokens.shape[0], 1, -1))
        parts.append(self.wte(tokens[:, max(start - 1, 0) : end - 1]))
        return torch.cat(parts, dim=1) + self.wpe.weight[start:end]

    def _inputs(self, tokens: Tensor, bert_mask: Tensor | None) -> Tensor:
        if self.cfg.objective == "ar":
            if bert_mask is not None:
                raise UserError("bert_mask is only accepted by a model with objective='bert'")
            return self._ar_inputs(tokens, 0, tokens.shape[1])
        x = self.wte(tokens)
        if bert_mask is not None:
            if bert_mask.shape != tokens.shape or bert_mask.dtype != torch.bool:
                raise UserError(f"bert_mask must be a bool tensor shaped like tokens {tuple(tokens.shape)}, "
                                 f"got {tuple(bert_mask.shape)} {bert_mask.dtype}")
            x = torch.where(bert_mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        return x + self.wpe.weight[: tokens.shape[1]]

    # ---------------------------------------------------------------- training
    def forward(self, tokens: Tensor, *, return_hidden: bool = False, bert_mask: Tensor | None = None) -> IGPTOutput:
        """Logits (B, T, V) where ``logits[:, t]`` predicts token t; with ``return_hidden`` also the
        ln_1 outputs of every block and the ln_f output (n_layer + 1 tensors (B, T, D))."""
        self._check_tokens(tokens)
        x = self._inputs(tokens, bert_mask)
        hidden = []
        for block in self.blocks:
            x, h = self._run_block(block, x)
            if return_hidden:
                hidden.append(h)
        x = self.ln_f(x)
        if return_hidden:
            hidden.append(x)
        return IGPTOutput(self.head(x), tuple(hidden) if return_hidden else None)

    def sample_bert_mask(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Bool mask (B, T): each position independently with probability mask_prob, at least one per row."""
        device = generator.device if generator is not None else tokens.device
        r = torch.rand(tokens.shape, generator=generator, device=device).to(tokens.device)
        mask = r < self.cfg.mask_prob
        empty_rows = ~mask.any(dim=1, keepdim=True)
        return mask | (empty_rows & (r == r.min(dim=1, keepdim=True).values))

    def loss(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean nats per token of the configured objective (BERT: over the masked positions only)."""
        if self.cfg.objective == "ar":
            logits = self(tokens).logits
            return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        mask = self.sample_bert_mask(tokens, generator)
        logits = self(tokens, bert_mask=mask).logits
        return F.cross_entropy(logits[mask].float(), tokens[mask])

    # ---------------------------------------------------------------- probes
    def features(self, tokens: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """Average-pooled hidden states {layer: (B, D)} (see ``forward``), running only the blocks needed."""
        self._check_layers(layers)
        self._check_tokens(tokens)
        return self._pooled(self._inputs(tokens, None), layers)

    # ---------------------------------------------------------------- sampling
    def decode(self, tokens: Tensor, cache: KVCache, end: int) -> Tensor:
        """Logits (B, end - cache.length, V) for positions [cache.length, end), extending the cache.

        ``tokens[:, :end - 1]`` must hold the sequence so far (position p sees token p-1)."""
        if self.cfg.objective != "ar":
            raise UserError("incremental decoding needs objective='ar'")
        start = cache.length
        if not start < end <= min(cache.max_len, self.cfg.n_ctx) or tokens.shape[1] < end - 1:
            raise UserError(f"cannot decode positions [{start}, {end}) from {tokens.shape[1]} tokens "
                             f"with a cache of {cache.max_len}")
        return self.head(self._decode_hidden(self._ar_inputs(tokens, start, end), cache))

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
        """Sample (B, n_tokens) tokens (default n_ctx) with a KV cache, continuing ``prefix`` (B, P) if given.

        ``temperature=0`` picks the most likely token; ``top_k`` keeps the k most likely; ``generator``
        must live on the model's device."""
        if self.cfg.objective != "ar":
            raise UserError("generate needs a model trained with objective='ar'")
        n_tokens = self.cfg.n_ctx if n_tokens is None else n_tokens
        if not 1 <= n_tokens <= self.cfg.n_ctx:
            raise UserError(f"n_tokens must be in [1, {self.cfg.n_ctx}], got {n_tokens}")
        device = self.wte.weight.device
        prefix = sampling_prefix(prefix, batch_size, n_tokens, temperature, top_k, device)
        self._check_tokens(prefix, "prefix")
        B, P = prefix.shape
        out = torch.empty(B, n_tokens, dtype=torch.long, device=device)
        out[:, :P] = prefix
        cache = KVCache(self.cfg.n_layer, n_tokens)
        for t in range(P, n_tokens):
            logits = self.decode(out, cache, t + 1)[:, -1]
            out[:, t] = _sample(logits, temperature, top_k, generator)
        return out

    # ---------------------------------------------------------------- accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the lookup tables (wte, wpe, SOS, mask)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel() + self.cfg.n_embd  # + the SOS or mask vector
        return n


def sampling_prefix(prefix: Tensor | None, batch_size: int | None, n_tokens: int, temperature: float,
                    top_k: int | None, device: torch.device | str) -> Tensor:
    """The (B, P) prefix ``generate`` continues (B empty rows when None), with the sampling options checked."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if prefix is None:
        if batch_size is None or batch_size < 1:
            raise UserError(f"give a positive batch_size or a prefix, got batch_size={batch_size}")
        return torch.empty(batch_size, 0, dtype=torch.long, device=device)
    if batch_size is not None and batch_size != prefix.shape[0]:
        raise UserError(f"batch_size={batch_size} does not match the prefix batch {prefix.shape[0]}")
    if prefix.shape[1] > n_tokens:
        raise UserError(f"prefix has {prefix.shape[1]} tokens, more than n_tokens={n_tokens}")
    return prefix


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """One token per row from (B, V) logits."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
