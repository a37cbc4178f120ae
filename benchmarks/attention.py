"""Causal bf16 attention on a GPU: our Triton kernel against torch SDPA's FlashAttention and cuDNN backends.

For each (B, H, S, D) it times forward and forward+backward (median of triton.testing.do_bench), reports
TFLOP/s with causal FLOPs = 2·B·H·S²·D forward and 3.5× that for forward+backward, measures each
implementation's relative error against a float32 reference (output and dQ, dK, dV, on the first batch
element), prints a table of ratios and writes JSON.

    python benchmarks/attention.py --out benchmarks/results/attention.json [--autotune]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import flash_attention  # noqa: E402
from kernels.flash_attention import tuned_configs  # noqa: E402
from kernels.reference import attention_reference  # noqa: E402

SHAPES = [(16, 8, 1024, 64), (16, 8, 1024, 128), (16, 16, 1024, 96), (7, 16, 2304, 96), (4, 24, 4096, 128)]


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def _ours(autotune: bool):
    def run(q, k, v):
        os.environ["IGPT_FLASH_AUTOTUNE"] = "1" if autotune else "0"
        return flash_attention(q, k, v, causal=True)

    return run


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def measure(name, fn, q, k, v, do, ref, flops_fwd) -> dict:
    """Errors against `ref` (first batch element) and fwd / fwd+bwd times of one implementation."""
    res: dict = {}
    try:  # timings first: an autotuned kernel tunes on its first call, which must be at full size
        with torch.no_grad():
            ms_f = triton.testing.do_bench(lambda: fn(q, k, v), warmup=50, rep=300, return_mode="median")
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        ms_fb = triton.testing.do_bench(
            lambda: fn(qg, kg, vg).backward(do), warmup=50, rep=300, grad_to_none=[qg, kg, vg], return_mode="median"
        )
        res.update(
            fwd_ms=ms_f, fwd_bwd_ms=ms_fb,
            fwd_tflops=flops_fwd / ms_f * 1e-9, fwd_bwd_tflops=3.5 * flops_fwd / ms_fb * 1e-9,
        )
        got = _fwd_bwd(fn, q[:1], k[:1], v[:1], do[:1])
        res["rel_err"] = {n: _rel(x, r) for n, x, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    except Exception as exc:  # one failing backend must not lose the others' numbers
        res["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    print(f"  {name:14s} " + (f"fwd {res['fwd_tflops']:6.1f}  fwd+bwd {res['fwd_bwd_tflops']:6.1f} TFLOP/s  "
          f"err {max(res['rel_err'].values()):.1e}" if "fwd_tflops" in res else res.get("error", "")), flush=True)
    return res


def _compile_job(job) -> str | None:
    """Compile (into Triton's disk cache) forward and backward with one candidate config per kernel."""
    d, picks = job
    fa = importlib.import_module("kernels.flash_attention")
    fa.select_configs = lambda *a, **kw: {kind: fa.KernelConfig(*cfg) for kind, cfg in picks.items()}
    try:
        q, k, v, do = (torch.randn(1, 2, 1024, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        _fwd_bwd(_ours(False), q, k, v, do)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # a config that does not fit is reported, the autotuner skips it
        return f"D={d} {picks}: {type(exc).__name__}: {str(exc)[:200]}"


def precompile(head_dims, workers: int) -> None:
    """Compile every autotuning candidate in parallel processes, so autotuning only times them."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    space = importlib.import_module("kernels.flash_attention").AUTOTUNE_SPACE
    n = max(len(c) for c in space.values())
    jobs = [(d, {kind: cands[i % len(cands)] for kind, cands in space.items()}) for d in head_dims for i in range(n)]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        for err in pool.map(_compile_job, jobs):
            if err:
                print("precompile:", err, flush=True)
    print(f"precompiled {len(jobs)} config sets in {time.time() - t0:.0f} s", flush=True)


def run_shape(shape, impls) -> dict:
    b, h, s, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    ref = _fwd_bwd(lambda a, c, e: attention_reference(a, c, e, causal=True), *(t[:1].float() for t in (q, k, v, do)))
    flops_fwd = 2.0 * b * h * s * s * d
    print(f"(B, H, S, D) = {shape}", flush=True)
    out = {name: measure(name, fn, q, k, v, do, ref, flops_fwd) for name, fn in impls.items()}
    del ref
    torch.cuda.empty_cache()
    return out


def kernel_resources() -> dict:
    """Registers, spills and shared memory of every compiled variant of our three main kernels (best effort)."""
    fa = importlib.import_module("kernels.flash_attention")
    out: dict = {}
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        try:
            for cache, *_ in getattr(fa, name).fn.device_caches.values():
                for key, ck in cache.items():
                    meta = ck.metadata
                    out.setdefault(name, []).append({
                        "regs": ck.n_regs, "spills": ck.n_spills, "shared": meta.shared,
                        "warps": meta.num_warps, "stages": meta.num_stages, "key": str(key)[-400:],
                    })
        except Exception as exc:  # internal API: report, never fail the benchmark on it
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def ratio_table(results: dict, ours: str) -> list[str]:
    lines = [f"{'shape':22s} {'ours fwd':>9s} {'ours f+b':>9s} {'FA2 f+b':>8s} {'cuDNN f+b':>9s} "
             f"{'fwd/FA2':>8s} {'fwd/cuDNN':>9s} {'f+b/FA2':>8s} {'f+b/cuDNN':>9s}"]
    for shape, r in results.items():
        o, fa, cu = r.get(ours, {}), r.get("sdpa_flash", {}), r.get("sdpa_cudnn", {})

        def val(x, key):
            return x.get(key, float("nan"))

        lines.append(
            f"{shape:22s} {val(o, 'fwd_tflops'):9.1f} {val(o, 'fwd_bwd_tflops'):9.1f} {val(fa, 'fwd_bwd_tflops'):8.1f} "
            f"{val(cu, 'fwd_bwd_tflops'):9.1f} {val(o, 'fwd_tflops') / val(fa, 'fwd_tflops'):8.2f} "
            f"{val(o, 'fwd_tflops') / val(cu, 'fwd_tflops'):9.2f} {val(o, 'fwd_bwd_tflops') / val(fa, 'fwd_bwd_tflops'):8.2f} "
            f"{val(o, 'fwd_bwd_tflops') / val(cu, 'fwd_bwd_tflops'):9.2f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.json"))
    ap.add_argument("--autotune", action="store_true", help="also time our kernel with IGPT_FLASH_AUTOTUNE=1")
    ap.add_argument("--precompile", type=int, default=0, metavar="N",
                    help="compile the autotuning candidates in N processes first")
    ap.add_argument("--shapes", default=None, help="B,H,S,D;B,H,S,D;... (default: the five iGPT shapes)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]

    impls = {"ours": _ours(False)}
    if args.autotune:
        impls["ours_autotune"] = _ours(True)
    impls["sdpa_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
    impls["sdpa_cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)

    t0 = time.time()
    if args.autotune and args.precompile:
        precompile(sorted({s[3] for s in shapes}), args.precompile)
    results = {str(shape): run_shape(shape, impls) for shape in shapes}
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "causal": True,
        "flops": "forward 2*B*H*S^2*D (causal), forward+backward 3.5x",
        "error": "relative L2 error vs float32 reference on batch element 0",
        "results": results,
        "autotuned_configs": tuned_configs(),
        "kernel_resources": kernel_resources(),
        "wall_s": time.time() - t0,
    }
    print(f"\n{report['device']}  torch {report['torch']}  triton {report['triton']}  (TFLOP/s; ratios ours / baseline)")
    for ours in [n for n in impls if n.startswith("ours")]:
        print(f"-- {ours}")
        print("\n".join(ratio_table(results, ours)))
    if report["autotuned_configs"]:
        print("autotuned:", json.dumps(report["autotuned_configs"], indent=1))
    for name, variants in report["kernel_resources"].items():
        if isinstance(variants, list):
            spills = [(v["warps"], v["stages"], v["regs"], v["spills"]) for v in variants if v["spills"]]
            print(f"{name}: {len(variants)} variants, (warps, stages, regs, spills) with spills: {spills}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
