"""The mapping between our ``IGPT`` and Hugging Face's ``ImageGPTForCausalImageModeling`` (no transformers import).

Hugging Face keeps the start token as row V of a (V+1, D) ``transformer.wte``; ours is the separate ``sos``
vector. Its attention and MLP layers are ``Conv1D`` with weights stored (in, out), ours ``nn.Linear`` (out, in);
``c_attn`` is q|k|v in both. Its ``ImageGPTLayerNorm`` is our ``norm="rms"`` (weight, no bias) and its
``lm_head`` our untied, bias-free ``head``. The palette's counterpart is the image processor's ``clusters``:
(K, 3) floats in [-1, 1], colour = 127.5 (c + 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from igpt.errors import UserError
from igpt.pretrain.model import NORM_EPS, IGPTConfig

HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}  # ours → Hugging Face's name
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # (in, out) weights in Hugging Face
BLOCK_PARAMS = ("ln_1.weight", "ln_2.weight", *(f"{m}.{p}" for m in CONV1D for p in ("weight", "bias")))


class NotConvertible(UserError):
    """A model or a Hugging Face directory that the other side cannot represent exactly."""


def check_exportable(cfg: IGPTConfig) -> None:
    """Raise ``NotConvertible`` unless ``cfg`` has an exact Hugging Face ImageGPT counterpart."""
    if cfg.unit != "pixel":
        raise NotConvertible(f"only pixel models export to Hugging Face ImageGPT; this one has unit={cfg.unit!r} "
                             "(ImageGPT has no patch embedding); export it as a release with igpt export")
    if cfg.objective != "ar":
        raise NotConvertible(f"only autoregressive models export to Hugging Face ImageGPT; this one has "
                             f"objective={cfg.objective!r} (a BERT model and its mask embedding have no counterpart)")
    if cfg.norm != "rms":
        raise NotConvertible(f"Hugging Face ImageGPT normalises with an RMS norm without bias; this model has "
                             f"norm={cfg.norm!r} (train with model.norm=rms to export)")


def hf_config_kwargs(cfg: IGPTConfig) -> dict[str, Any]:
    """``transformers.ImageGPTConfig`` arguments of an exportable ``cfg`` (dropout 0: our model has none)."""
    check_exportable(cfg)
    return dict(vocab_size=cfg.vocab_size + 1, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=None, activation_function=HF_ACTIVATIONS[cfg.activation],
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=NORM_EPS,
                initializer_range=cfg.init_std, tie_word_embeddings=False)


def model_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Our ``IGPTConfig`` fields for a Hugging Face ImageGPT config (``config.json`` as a dict); raise
    ``NotConvertible`` naming any setting our model does not have. Dropout is ignored (ours trains without)."""
    activation = {v: k for k, v in HF_ACTIVATIONS.items()}.get(hf.get("activation_function"))
    unsupported = {
        "activation_function": activation is None,
        "layer_norm_epsilon": hf.get("layer_norm_epsilon") != NORM_EPS,
        "n_inner": hf.get("n_inner") not in (None, 4 * hf["n_embd"]),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        "add_cross_attention": bool(hf.get("add_cross_attention")),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings")),
    }
    bad = {k: hf.get(k) for k, is_bad in unsupported.items() if is_bad}
    if bad:
        raise NotConvertible(f"Hugging Face ImageGPT settings with no counterpart in our model: {bad} "
                             f"(supported: activation_function in {sorted(HF_ACTIVATIONS.values())}, "
                             f"layer_norm_epsilon={NORM_EPS}, n_inner=4*n_embd, plain scaled causal self-attention, "
                             "untied lm_head)")
    return dict(vocab_size=hf["vocab_size"] - 1, n_ctx=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                n_embd=hf["n_embd"], objective="ar", norm="rms", activation=activation,
                init_std=hf.get("initializer_range", IGPTConfig.init_std))


def _key_pairs(n_layer: int) -> list[tuple[str, str]]:
    """(our key, Hugging Face key) of every parameter but the token table and the start token."""
    pairs = [("wpe.weight", "transformer.wpe.weight"), ("ln_f.weight", "transformer.ln_f.weight"),
             ("head.weight", "lm_head.weight")]
    pairs += [(f"blocks.{i}.{p}", f"transformer.h.{i}.{p}") for i in range(n_layer) for p in BLOCK_PARAMS]
    return pairs


def _conv1d(key: str) -> bool:
    return key.endswith(".weight") and any(f".{m}." in key for m in CONV1D)


def _check_keys(state: dict[str, Tensor], expected: set[str], what: str) -> None:
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise NotConvertible(f"{what} does not fit: missing {missing[:6]}, unexpected {extra[:6]}")


def to_hf_state(state: dict[str, Tensor], cfg: IGPTConfig) -> dict[str, Tensor]:
    """Hugging Face ``ImageGPTForCausalImageModeling`` state dict of our ``IGPT`` state dict."""
    check_exportable(cfg)
    pairs = _key_pairs(cfg.n_layer)
    _check_keys(state, {ours for ours, _ in pairs} | {"wte.weight", "sos"}, "the model's state dict")
    out = {"transformer.wte.weight": torch.cat([state["wte.weight"], state["sos"][None]])}
    for ours, theirs in pairs:
        out[theirs] = state[ours].T if _conv1d(ours) else state[ours]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_hf_state(state: dict[str, Tensor], n_layer: int) -> dict[str, Tensor]:
    """Our ``IGPT`` state dict (``norm="rms"``) of a Hugging Face ``ImageGPTForCausalImageModeling`` state dict."""
    pairs = _key_pairs(n_layer)
    _check_keys(state, {theirs for _, theirs in pairs} | {"transformer.wte.weight"}, "the Hugging Face weights")
    wte = state["transformer.wte.weight"]
    out = {"wte.weight": wte[:-1], "sos": wte[-1]}
    for ours, theirs in pairs:
        out[ours] = state[theirs].T if _conv1d(ours) else state[theirs]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------ palette
@dataclass(frozen=True)
class PaletteRounding:
    """How far the uint8 palette is from the float cluster centres, in 0..255 colour units."""

    max_abs: float
    mean_abs: float
    clipped: int  # centres outside [0, 255] before rounding
    duplicates: int  # centres that round onto an earlier centre's colour

    def describe(self) -> str:
        return (f"palette rounding to uint8: max {self.max_abs:.3f}, mean {self.mean_abs:.3f} colour levels; "
                f"{self.clipped} centres clipped, {self.duplicates} duplicate colours")


def clusters_from_palette(palette: np.ndarray) -> np.ndarray:
    """Hugging Face ``clusters`` (K, 3) float32 in [-1, 1] of a (K, 3) uint8 palette."""
    return (palette.astype(np.float64) / 127.5 - 1.0).astype(np.float32)


def palette_from_clusters(clusters: np.ndarray) -> tuple[np.ndarray, PaletteRounding]:
    """The (K, 3) uint8 palette nearest to Hugging Face ``clusters``, and what the rounding cost."""
    clusters = np.asarray(clusters, dtype=np.float64)
    if clusters.ndim != 2 or clusters.shape[1] != 3 or not len(clusters):
        raise NotConvertible(f"clusters must be a (K, 3) array, got shape {clusters.shape}")
    colours = 127.5 * (clusters + 1.0)
    palette = np.clip(np.rint(colours), 0, 255).astype(np.uint8)
    error = np.abs(colours - palette)
    duplicates = len(palette) - len(np.unique(palette, axis=0))
    clipped = int(((colours < 0) | (colours > 255)).any(axis=1).sum())
    return palette, PaletteRounding(float(error.max()), float(error.mean()), clipped, duplicates)


def nearest_clusters(rgb: np.ndarray, clusters: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For (..., 3) uint8 pixels, the index of the nearest float centre (what Hugging Face's processor
    computes, here with exact float64 distances; lowest index on ties), shaped (...)."""
    from igpt.data_pipeline.quantize import rgb_codes

    codes, inverse = np.unique(rgb_codes(np.asarray(rgb)), return_inverse=True)
    colours = np.stack([codes & 255, (codes >> 8) & 255, codes >> 16], axis=1)
    x = torch.from_numpy(colours.astype(np.float64) / 127.5 - 1.0)
    c = torch.from_numpy(np.asarray(clusters, dtype=np.float64))
    nearest = torch.cat([((x[s:s + chunk, None] - c[None]) ** 2).sum(-1).argmin(1) for s in range(0, len(x), chunk)])
    return nearest.numpy()[inverse.reshape(-1)].reshape(np.shape(rgb)[:-1])
