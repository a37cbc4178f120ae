"""``igpt export … --format hf`` and ``igpt import hf``: our releases ↔ Hugging Face ImageGPT directories.

A Hugging Face directory holds ``config.json`` and the weights of ``ImageGPTForCausalImageModeling`` (what
``save_pretrained`` writes, loadable with ``from_pretrained``) and ``preprocessor_config.json`` with the
palette as ``clusters``. The mapping itself is ``igpt.pretrain.hf_convert``; transformers (the ``hf`` extra) is
imported inside these functions only.

The palette: ours is uint8 (its identity is the file's sha256), Hugging Face's float. Export is exact
(c = p / 127.5 - 1 rounds back to p); import rounds each centre to the nearest colour and reports the
rounding, and with ``images`` how often our tokens differ on them from the float centres' (the tokens
Hugging Face's processor gives).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.data_pipeline.io import atomic_dir, write_json_atomic
from igpt.data_pipeline.palette import load_palette, save_palette
from igpt.data_pipeline.progress import forced
from igpt.errors import UserError
from igpt.pretrain.config import DataSection, ModelSection, TrainConfig
from igpt.pretrain.hf_convert import (NotConvertible, PaletteRounding, check_exportable, clusters_from_palette,
                                 from_hf_state, hf_config_kwargs, model_fields_from_hf, nearest_clusters,
                                 palette_from_clusters, to_hf_state)
from igpt.pretrain.model import IGPT
from igpt.pretrain.presets import MODEL_PRESETS
from igpt.pretrain.release import load_model, palette_file, write_release

HF_CONFIG, HF_PREPROCESSOR = "config.json", "preprocessor_config.json"
HF_MODEL_TYPE = "imagegpt"
BICUBIC = 3  # PIL's code, the resampling of our shards (Hugging Face's processor resizes without a crop)


class NotHuggingFace(UserError):
    """A directory that is not a Hugging Face ImageGPT model (or lacks what a release needs from it)."""


def _transformers() -> Any:
    """The transformers module, its progress bars following ours (``IGPT_PROGRESS``) and its log on errors only."""
    try:
        import transformers
    except ImportError as err:
        raise NotConvertible("Hugging Face interop needs transformers: pip install -e '.[hf]'") from err
    transformers.utils.logging.set_verbosity_error()
    if not forced():
        transformers.utils.logging.disable_progress_bar()
    return transformers


def _side(n_ctx: int) -> int:
    side = math.isqrt(n_ctx)
    if side * side != n_ctx:
        raise NotConvertible(f"the model's context {n_ctx} is not a square image")
    return side


def _refuse_nonempty(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")


# ------------------------------------------------------------------------------------------ export
def preprocessor_config(palette: np.ndarray, side: int) -> dict[str, Any]:
    """``preprocessor_config.json`` of ``ImageGPTImageProcessor`` for our palette at ``side``×``side``."""
    return {"image_processor_type": "ImageGPTImageProcessor", "clusters": clusters_from_palette(palette).tolist(),
            "do_color_quantize": True, "do_normalize": True, "do_resize": True, "resample": BICUBIC,
            "size": {"height": side, "width": side}}


def export_hf(source: str | os.PathLike, out: str | os.PathLike, trust: bool = False) -> Path:
    """Write the Hugging Face directory ``out`` (must not exist or be empty) of a release or run dir
    (``trust``: as ``load_model``'s)."""
    out = Path(out)
    _refuse_nonempty(out)
    model, cfg, sha = load_model(source, trust)
    check_exportable(cfg.model)
    side = _side(cfg.model.n_ctx)
    palette, _ = load_palette(palette_file(source, cfg.data.dir, sha))
    tf = _transformers()
    hf_model = tf.ImageGPTForCausalImageModeling(tf.ImageGPTConfig(**hf_config_kwargs(cfg.model)))
    hf_model.load_state_dict(to_hf_state(model.state_dict(), cfg.model), strict=True)
    with atomic_dir(out) as tmp:
        hf_model.save_pretrained(tmp)
        write_json_atomic(preprocessor_config(palette, side), tmp / HF_PREPROCESSOR)
    return out


# ------------------------------------------------------------------------------------------ import
@dataclass(frozen=True)
class TokenDisagreement:
    """Our tokens (uint8 palette) against the float clusters' on the same pixels; ``ties``: differing pixels whose
    two colours are equally near in the uint8 palette (only the tie-break differs)."""

    images: int
    pixels: int
    differing: int
    ties: int

    @property
    def fraction(self) -> float:
        return self.differing / max(self.pixels, 1)

    def describe(self) -> str:
        return (f"tokens differ from the float clusters' on {self.differing} of {self.pixels} pixels "
                f"({100 * self.fraction:.4f}%) of {self.images} images, {self.ties} of them ties "
                "(colours equally near in the uint8 palette)")


@dataclass(frozen=True)
class ImportReport:
    release: Path
    rounding: PaletteRounding
    disagreement: TokenDisagreement | None


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The ``ImageGPTConfig`` of a Hugging Face ImageGPT directory as a dict (the keys its ``config.json`` leaves
    out at their defaults), or ``NotHuggingFace``."""
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise NotHuggingFace(f"{hf_dir} is not a Hugging Face model directory (no {HF_CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NotHuggingFace(f"{path} is not JSON: {err}") from None
    if not isinstance(config, dict) or config.get("model_type") != HF_MODEL_TYPE:
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise NotHuggingFace(f"{hf_dir} holds a Hugging Face {kind!r} model, not {HF_MODEL_TYPE!r}")
    return _transformers().ImageGPTConfig.from_pretrained(hf_dir, local_files_only=True).to_dict()


def read_clusters(hf_dir: Path) -> np.ndarray:
    """The processor's ``clusters`` (K, 3) of a Hugging Face ImageGPT directory."""
    path = hf_dir / HF_PREPROCESSOR
    clusters = json.loads(path.read_text()).get("clusters") if path.is_file() else None
    if clusters is None:
        raise NotHuggingFace(f"{hf_dir} has no {HF_PREPROCESSOR} with 'clusters': a release needs the palette")
    return np.asarray(clusters, dtype=np.float64)


def _hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    tf = _transformers()
    model, info = tf.ImageGPTForCausalImageModeling.from_pretrained(hf_dir, local_files_only=True,
                                                                     output_loading_info=True)
    if info["missing_keys"]:
        raise NotConvertible(f"{hf_dir} lacks weights of ImageGPTForCausalImageModeling: "
                             f"{sorted(info['missing_keys'])[:6]}")
    return model.state_dict()


def _preset(fields: dict[str, Any]) -> str:
    """The preset with these layer, width and head counts (the schema's default preset otherwise)."""
    shape = {k: fields[k] for k in ("n_layer", "n_embd", "n_head")}
    return next((name for name, values in MODEL_PRESETS.items() if values == shape), ModelSection.preset)


def token_disagreement(palette: np.ndarray, clusters: np.ndarray, sources: list[str], side: int,
                       limit: int) -> TokenDisagreement:
    """Our tokens (``palette``) against the nearest float centres' (``clusters``, as Hugging Face's processor
    assigns them) on the same pixels: up to ``limit`` images of ``sources`` decoded at ``side``×``side`` as our
    shards are."""
    from igpt.data_pipeline.quantize import Quantizer
    from igpt.data_pipeline.sources import decoded_images, find_images

    quantizer = Quantizer(palette, progress=False)
    decoded = itertools.islice(decoded_images(find_images(sources).items, side), limit)
    images = pixels = differing = ties = 0
    while batch := list(itertools.islice(decoded, 256)):
        rgb = np.stack(batch).reshape(-1, 3)
        ours, theirs = quantizer.quantize(rgb), nearest_clusters(rgb, clusters)
        apart = ours != theirs
        near = [((rgb[apart].astype(np.int64) - palette[t[apart]]) ** 2).sum(1) for t in (ours, theirs)]
        images, pixels, differing = images + len(batch), pixels + len(rgb), differing + int(apart.sum())
        ties += int((near[0] == near[1]).sum())
    return TokenDisagreement(images, pixels, differing, ties)


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, images: list[str] | None = None,
              limit: int = 2000) -> ImportReport:
    """Write our release dir ``out`` (must not exist or be empty) of a Hugging Face ImageGPT directory; with
    ``images`` (sources as for ``igpt data shard``) also measure token disagreement on up to ``limit`` of them."""
    hf_dir, out = Path(hf_dir), Path(out)
    _refuse_nonempty(out)
    fields = model_fields_from_hf(read_hf_config(hf_dir))
    clusters = read_clusters(hf_dir)
    if len(clusters) != fields["vocab_size"]:
        raise NotConvertible(f"{hf_dir}: {len(clusters)} clusters for a vocabulary of {fields['vocab_size']}")
    palette, rounding = palette_from_clusters(clusters)
    state = from_hf_state(_hf_state(hf_dir), fields["n_layer"])
    cfg = TrainConfig(model=ModelSection(**fields, preset=_preset(fields)), data=DataSection(dir=str(hf_dir.resolve())))
    with torch.device("meta"):
        IGPT(cfg.model).load_state_dict(state, strict=True, assign=True)  # the names and shapes fit the config
    disagreement = None
    if images:
        disagreement = token_disagreement(palette, clusters, images, _side(cfg.model.n_ctx), limit)
    with tempfile.TemporaryDirectory() as tmp:
        sha = save_palette(palette, Path(tmp) / "palette.npy")
        metadata = {"palette_sha256": sha, "source": str(hf_dir.resolve()), "format": "huggingface-imagegpt",
                    "palette_rounding": rounding.describe()}
        if disagreement is not None:
            metadata["token_disagreement"] = disagreement.describe()
        write_release(out, state, cfg, Path(tmp) / "palette.npy", metadata)
    return ImportReport(out, rounding, disagreement)
