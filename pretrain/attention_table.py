"""The measured-attention table behind ``attn_backend=auto``: which backend is fastest per signature.

An entry is one benchmarked signature (GPU name, dtype, head dim, sequence length, causality) with the
median forward+backward milliseconds of each backend and the fastest (``best``). ``benchmarks/attention.py``
writes the table from its measurements; ``pretrain/attention_table.json`` ships as package data of
``igpt.pretrain`` (``IGPT_ATTN_TABLE`` names another file). For a sequence length that was not measured, the nearest measured one
of the same device, dtype, head dim and causality decides (ties: the shorter); with none, SDPA chooses itself.
"""
from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

DEFAULT_TABLE = Path(str(files("igpt.pretrain") / "attention_table.json"))  # package data
TABLE_ENV = "IGPT_ATTN_TABLE"
BENCH_NAMES = {"ours": "triton", "sdpa_flash": "sdpa_flash", "sdpa_cudnn": "sdpa_cudnn"}  # benchmark → backend
FALLBACK = "sdpa"
Rule = tuple[tuple[int | None, str], ...]  # (longest sequence length or None for any, backend), in order


def table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or DEFAULT_TABLE)


def load_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of the table at ``path`` ([] when there is no file)."""
    if not path.is_file():
        return []
    return json.loads(path.read_text())["entries"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


ABOUT = ("attn_backend=auto: the fastest backend per (device, dtype, head_dim, seq_len, causal) by median "
         "forward+backward ms (benchmarks/attention.py); shape is the (B, H, S, D) measured")


def _key(entry: dict[str, Any]) -> tuple:
    return entry["device"], entry["dtype"], entry["head_dim"], entry["seq_len"], entry["causal"]


def table_entries(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of one ``benchmarks/attention.py`` report: per signature, the median forward+backward ms of
    every backend that ran without error and the fastest. Shapes that share a signature (another batch or
    head count) keep the one with the most batch·heads, the nearest to a training step."""
    source = f"torch {report['torch']}, triton {report['triton']}, {report['date']}"
    chosen: dict[tuple, dict[str, Any]] = {}
    for shape, res in report["results"].items():
        b, h, s, d = (int(x) for x in shape.strip("()").split(","))
        ms = {BENCH_NAMES[n]: round(r["fwd_bwd_ms"], 4) for n, r in res.items()
              if n in BENCH_NAMES and "fwd_bwd_ms" in r and "error" not in r}
        if not ms:
            continue
        entry = {"device": report["device"], "dtype": report["dtype"], "head_dim": d, "seq_len": s,
                 "causal": report["causal"], "best": min(ms, key=lambda n: (ms[n], n)),
                 "fwd_bwd_ms": dict(sorted(ms.items())), "shape": [b, h, s, d], "source": source}
        old = chosen.get(_key(entry))
        if old is None or b * h > old["shape"][0] * old["shape"][1]:
            chosen[_key(entry)] = entry
    return list(chosen.values())


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, Any]:
    """The table of ``new``'s entries and those of ``old`` with a signature ``new`` lacks (another GPU, say)."""
    fresh = {_key(e) for e in new}
    return {"about": ABOUT, "entries": sorted([e for e in old if _key(e) not in fresh] + new, key=_key)}


def dumps(table: dict[str, Any]) -> str:
    """The table as JSON with one entry per line."""
    entries = ",\n  ".join(json.dumps(e) for e in table["entries"])
    return f'{{"about": {json.dumps(table["about"])},\n "entries": [\n  {entries}\n ]}}\n'


def auto_rule(entries: list[dict[str, Any]], device: str, dtype: torch.dtype, head_dim: int,
              causal: bool) -> tuple[Rule, str]:
    """The backend per sequence length on ``device`` (a GPU name) for this dtype, head dim and causality, and a
    line that says why. Each measured length rules up to the midpoint to the next one."""
    rows = sorted((e for e in entries if (e["device"], e["dtype"], e["head_dim"], e["causal"])
                   == (device, dtype_name(dtype), head_dim, causal)), key=lambda e: e["seq_len"])
    if not rows:
        return ((None, FALLBACK),), f"{FALLBACK} (nothing measured on {device} for this signature: SDPA picks its kernel)"
    rule: list[tuple[int | None, str]] = []
    for row, nxt in zip(rows, [*rows[1:], None]):
        bound = None if nxt is None else (row["seq_len"] + nxt["seq_len"]) // 2
        if rule and rule[-1][1] == row["best"]:
            rule[-1] = (bound, row["best"])
        else:
            rule.append((bound, row["best"]))
    measured = "; ".join(f"S={e['seq_len']}: " + ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(
        e["fwd_bwd_ms"].items(), key=lambda x: x[1])) for e in rows)
    ranges = ", ".join(f"{name} up to S={bound}" if bound is not None else f"{name} beyond" for bound, name in rule)
    return tuple(rule), f"{ranges if len(rule) > 1 else rule[0][1]} (fwd+bwd ms {measured})"


def pick(rule: Rule, seq_len: int) -> str:
    """The backend the rule gives for ``seq_len``."""
    for bound, name in rule[:-1]:
        if seq_len <= bound:
            return name
    return rule[-1][1]
