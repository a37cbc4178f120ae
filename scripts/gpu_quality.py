"""Helpers of scripts/gpu_quality_check.sh (plain Python, no Ray or MLflow).

    python scripts/gpu_quality.py steps PROBE_RUN_DIR SECONDS   # steps that fill SECONDS at the probe's steady speed
    python scripts/gpu_quality.py summary OUT                    # the closing note's table from OUT's files

A run's speed comes from its tracked log windows (``tracking/metrics.jsonl``; their seconds leave out
validation and checkpoints), the first window (start-up, warm-up) left out when there are more.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from igpt.pretrain.config import load_config  # noqa: E402
from igpt.pretrain.tracking import METRICS_FILE, read_metrics, training_windows  # noqa: E402


def steady_steps_per_s(run_dir: Path) -> float:
    per_step = load_config(run_dir / "config.yaml").tokens_per_step()
    got = training_windows(read_metrics(run_dir / "tracking" / METRICS_FILE), per_step)
    steady = got[1:] or got
    return sum(s for s, _ in steady) / sum(t for _, t in steady)


def summary(out: Path) -> str:
    """A markdown table: the recipe's settings → val NLL, probes, raw pixels, training minutes."""
    cfg = load_config(out / "config.yaml")
    per_step = cfg.tokens_per_step()
    got = training_windows(read_metrics(out / METRICS_FILE), per_step)
    steps, seconds = sum(s for s, _ in got), sum(t for _, t in got)
    score = json.loads((out / "score.json").read_text())
    m, d, o = cfg.model, cfg.data, cfg.optim
    unit = f"{m.patch_size}x{m.patch_size} patches, {m.order} order, {m.target}, " if m.unit == "patch" else ""
    settings = (f"{unit}{m.n_layer}x{m.n_embd}, batch {cfg.global_batch()}, lr {o.lr:g}, "
                f"{steps} steps, hflip {d.hflip}, random_crop {d.random_crop}")
    best = str(score.get("probe_best_layer"))
    single = (_probe(score["probe_best_accuracy"], score["probe_l2_per_layer"][best], score["probe_l2_at_edge"][best],
                     f"layer {best}") if "probe_best_accuracy" in score else "-")
    concat = (_probe(score["probe_concat_accuracy"], score["probe_concat_l2"], score["probe_concat_l2_at_edge"],
                     f"layers {score['probe_concat_layers']}") if "probe_concat_accuracy" in score else "-")
    pixels = (_probe(score["raw_pixels_accuracy"], score["raw_pixels_l2"], score["raw_pixels_l2_at_edge"])
              if "raw_pixels_accuracy" in score else "-")
    return "\n".join([
        "| settings | tokens | tokens/s | training min | val NLL (nats/token) | probe, best layer | probe, concat | raw pixels |",
        "|---|---|---|---|---|---|---|---|",
        f"| {settings} | {steps * per_step / 1e6:.1f}M | {steps * per_step / seconds / 1e3:.0f}k | {seconds / 60:.2f} | "
        f"{score['val_nll']:.4f} | {single} | {concat} | {pixels} |",
    ])


def _probe(accuracy: float, l2: float, at_edge: bool, what: str = "") -> str:
    where = ", ".join(x for x in (what, f"L2 {l2:g}" + (" at the grid's edge" if at_edge else "")) if x)
    return f"{100 * accuracy:.1f}% ({where})"


def main(argv: list[str]) -> int:
    if argv[:1] == ["steps"] and len(argv) == 3:
        print(max(1, int(float(argv[2]) * steady_steps_per_s(Path(argv[1])))))
    elif argv[:1] == ["summary"] and len(argv) == 2:
        print(summary(Path(argv[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
