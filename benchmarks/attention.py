"""Causal bf16 attention on a GPU: our Triton kernel against torch SDPA's FlashAttention and cuDNN backends.

For each (B, H, S, D) it times forward and forward+backward in --repeats interleaved rounds (one
triton.testing.do_bench median per implementation and round) and reports the median over the rounds with
their range, TFLOP/s with causal FLOPs = 2·B·H·S²·D forward and 3.5× that for forward+backward, each
implementation's relative error against a float32 reference (output and dQ, dK, dV, on the first batch
element) and the host time to issue one forward+backward step (no sync: the Python and launch cost that
the GPU hides only when its kernels take longer). It prints a table of ratios (median and range of the
per-round ratios) and writes JSON and the attn_backend=auto table (pretrain/attention_table.py; entries of
other devices already in that file are kept) after every shape.

    python benchmarks/attention.py --out benchmarks/results/attention.json [--autotune]
    python benchmarks/attention.py --table-from benchmarks/results/attention_h200.json   # the table only, no GPU
    python benchmarks/attention.py --precompile 5 --wait-for FILE   # compile in parallel, time once FILE exists
    python benchmarks/attention.py --sweep --precompile 10 --out out/attention.json   # tune the backward first

--sweep times the fused backward kernel alone over a small config grid at SWEEP_SHAPES (after compiling the
candidates in parallel processes), with per-kernel times, end-to-end times and host (launch) time per step
for the default and the best configs, then runs the benchmark with the best configs in place of the defaults.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from igpt.data_pipeline.io import write_json_atomic, write_text_atomic  # noqa: E402
from igpt.kernels.flash_attention import flash_attention  # noqa: E402
from igpt.kernels.flash_attention import tuned_configs  # noqa: E402
from igpt.kernels.reference import attention_reference  # noqa: E402
from igpt.pretrain.attention_table import DEFAULT_TABLE, dumps, load_entries, merge, table_entries  # noqa: E402

# the iGPT shapes (S, M, L at 32x32, L at 48x48, XL at 64x64) and the GPU recipe's (64, 8, 1024, 64)
SHAPES = [(16, 8, 1024, 64), (64, 8, 1024, 64), (16, 8, 1024, 128), (16, 16, 1024, 96), (7, 16, 2304, 96),
          (4, 24, 4096, 128)]
SWEEP_SHAPES = [(16, 8, 1024, 64), (16, 8, 1024, 128)]
# (BLOCK_M, BLOCK_N) tiles of the fused backward: a program owns BLOCK_N keys (dK, dV) and BLOCK_N queries (dQ),
# stepping by BLOCK_M (BLOCK_N % BLOCK_M == 0).
SWEEP_TILES = {"bwd": [(64, 64), (32, 64), (32, 128), (64, 128)]}
MATMULS = {"fwd": 2, "bwd": 7}  # matrix products per (query, key) tile, for TFLOP/s of one kernel alone


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


def time_round(fn, q, k, v, do) -> tuple[float, float]:
    """One round: median ms of the forward (no grad) and of forward+backward."""
    with torch.no_grad():
        ms_f = triton.testing.do_bench(lambda: fn(q, k, v), warmup=10, rep=60, return_mode="median")
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ms_fb = triton.testing.do_bench(
        lambda: fn(qg, kg, vg).backward(do), warmup=10, rep=60, grad_to_none=[qg, kg, vg], return_mode="median"
    )
    return ms_f, ms_fb


def summarize(res: dict, flops_fwd: float) -> None:
    """Median and range over the rounds, and TFLOP/s of the medians, into `res`."""
    for kind, flops in (("fwd", flops_fwd), ("fwd_bwd", 3.5 * flops_fwd)):
        runs = res[f"{kind}_runs"]
        res[f"{kind}_ms"] = statistics.median(runs)
        res[f"{kind}_ms_range"] = [min(runs), max(runs)]
        res[f"{kind}_tflops"] = flops / res[f"{kind}_ms"] * 1e-9


def check(name, fn, q, k, v, do, ref) -> dict:
    """Host issue time per forward+backward step and errors against `ref` (first batch element)."""
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def step():
        fn(qg, kg, vg).backward(do)
        qg.grad = kg.grad = vg.grad = None

    res = host_ms(step)
    got = _fwd_bwd(fn, q[:1], k[:1], v[:1], do[:1])
    res["rel_err"] = {n: _rel(x, r) for n, x, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    return res


def _report_line(name: str, res: dict) -> str:
    if "error" in res:
        return f"  {name:14s} {res['error']}"
    lo, hi = res["fwd_bwd_ms_range"]
    return (f"  {name:14s} fwd {res['fwd_tflops']:6.1f}  fwd+bwd {res['fwd_bwd_tflops']:6.1f} TFLOP/s  "
            f"({res['fwd_bwd_ms']:.4f} ms, {lo:.4f}-{hi:.4f})  host {res['host_issue_ms']:.3f} ms/step  "
            f"err {max(res['rel_err'].values()):.1e}")


def _compile_job(job) -> str | None:
    """Compile (into Triton's disk cache) forward and backward with one candidate config per kernel."""
    d, picks = job
    fa = importlib.import_module("igpt.kernels.flash_attention")
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
    space = importlib.import_module("igpt.kernels.flash_attention").AUTOTUNE_SPACE
    n = max(len(c) for c in space.values())
    jobs = [(d, {kind: cands[i % len(cands)] for kind, cands in space.items()}) for d in head_dims for i in range(n)]
    _compile_in_parallel(_compile_job, jobs, workers, "config sets")


def _compile_in_parallel(job_fn, jobs: list, workers: int, what: str) -> None:
    """Run compile jobs in spawned processes (filling Triton's disk cache), printing each failure."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        for err in pool.map(job_fn, jobs):
            if err:
                print("precompile:", err, flush=True)
    print(f"precompiled {len(jobs)} {what} in {time.time() - t0:.0f} s", flush=True)


def run_shape(shape, impls, repeats: int) -> dict:
    """Every implementation in `repeats` interleaved timing rounds (timings first: an autotuned kernel tunes on
    its first call, which must be at full size), then host time and errors; one failure loses only its own."""
    b, h, s, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    ref = _fwd_bwd(lambda a, c, e: attention_reference(a, c, e, causal=True), *(t[:1].float() for t in (q, k, v, do)))
    flops_fwd = 2.0 * b * h * s * s * d
    print(f"(B, H, S, D) = {shape}", flush=True)
    out: dict = {name: {"fwd_runs": [], "fwd_bwd_runs": []} for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            res = out[name]
            if "error" in res:
                continue
            try:
                ms_f, ms_fb = time_round(fn, q, k, v, do)
                res["fwd_runs"].append(ms_f)
                res["fwd_bwd_runs"].append(ms_fb)
            except Exception as exc:  # out of resources and the like: record and go on with the others
                res["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
    for name, fn in impls.items():
        res = out[name]
        if "error" not in res:
            try:
                summarize(res, flops_fwd)
                res.update(check(name, fn, q, k, v, do, ref))
            except Exception as exc:
                res["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        print(_report_line(name, res), flush=True)
    del ref
    torch.cuda.empty_cache()
    return out


def _fa():
    return importlib.import_module("igpt.kernels.flash_attention")


def sweep_space(kind: str) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of the backward kernel."""
    return [(m, n, w, st) for m, n in SWEEP_TILES[kind] for w in (4, 8) for st in (2, 3)]


_INPUTS: dict = {}


def _sweep_inputs(shape):
    if shape not in _INPUTS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        _INPUTS[shape] = tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    return _INPUTS[shape]


def _sweep_compile_job(job) -> str | None:
    """Compile (into Triton's disk cache) one backward config, or forward+backward with the defaults."""
    shape, kind, cfg = job
    fa = _fa()
    try:
        if kind == "defaults":
            _fwd_bwd(_ours(False), *_sweep_inputs(shape))
        else:
            q, k, v, do = _sweep_inputs(shape)
            fa.backward_launcher(kind, q, k, v, do, True, fa.KernelConfig(*cfg))()
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # a config that does not fit is reported and skipped
        return f"{shape} {kind} {cfg}: {type(exc).__name__}: {str(exc)[:200]}"


def precompile_sweep(shapes, bench_shapes, workers: int) -> None:
    """Compile every sweep candidate, and the default configs of the benchmark shapes, in parallel processes."""
    jobs = [(s, "bwd", cfg) for s in shapes for cfg in sweep_space("bwd")]
    jobs += [((1, 2, s, d), "defaults", None) for _, _, s, d in bench_shapes]  # same specialisation as (B, H, s, d)
    jobs.sort(key=lambda j: -(j[0][3] if j[2] is None else j[0][3] * j[2][0] * j[2][1] // j[2][2]))  # slow first
    _compile_in_parallel(_sweep_compile_job, jobs, workers, "sweep jobs")


def _bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")


def host_ms(fn, n: int = 30) -> dict:
    """Host time to issue one call (no sync inside the loop) against wall time per call with the GPU drained.

    n stays small so that the launch queue never fills (a full queue would make the host wait for the GPU)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {"host_issue_ms": (issued - t0) / n * 1e3, "wall_ms": (done - t0) / n * 1e3}


def time_kernel(kind: str, shape, cfg) -> dict:
    """One kernel alone: median ms and TFLOP/s of its own products (causal)."""
    fa = _fa()
    b, h, s, d = shape
    q, k, v, do = _sweep_inputs(shape)
    res: dict = {"config": list(cfg) if cfg else None}
    try:
        launch = fa.backward_launcher(kind, q, k, v, do, True, fa.KernelConfig(*cfg) if cfg else None)
        res["ms"] = _bench_ms(launch)
        if kind in MATMULS:
            res["tflops"] = MATMULS[kind] * b * h * s * s * d / res["ms"] * 1e-9
    except Exception as exc:  # out of resources and the like: record and go on
        res["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return res


def _end_to_end(shape) -> dict:
    q, k, v, do = _sweep_inputs(shape)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def step():
        flash_attention(qg, kg, vg, causal=True).backward(do)
        qg.grad = kg.grad = vg.grad = None

    ms = triton.testing.do_bench(step, warmup=20, rep=100, grad_to_none=[qg, kg, vg], return_mode="median")
    b, h, s, d = shape
    return {"fwd_bwd_ms": ms, "fwd_bwd_tflops": 3.5 * 2.0 * b * h * s * s * d / ms * 1e-9, **host_ms(step)}


def use_configs(overrides: dict) -> None:
    """Replace the bfloat16 Hopper defaults for (head_dim, seq_len) with `overrides` in this process."""
    fa = _fa()
    base = fa.select_configs

    def patched(head_dim, seq_len, dtype, device):
        cfg = dict(base(head_dim, seq_len, dtype, device))
        if dtype == torch.bfloat16 and device.type == "cuda":
            cfg.update(overrides.get((head_dim, seq_len), {}))
        return cfg

    fa.select_configs = patched
    fa._plan.cache_clear()  # launch plans cache the configs they were built with


def sweep(shapes) -> tuple[dict, dict]:
    """Per shape: default per-kernel and end-to-end times, the backward config grid, and end-to-end with the best."""
    fa = _fa()
    report: dict = {}
    overrides: dict = {}
    for shape in shapes:
        _, _, s, d = shape
        t0 = time.time()
        rep = {"defaults": {kind: time_kernel(kind, shape, None) for kind in ("fwd", "delta", "bwd")}}
        rep["defaults"]["end_to_end"] = _end_to_end(shape)
        best = {}
        for kind in ("bwd",):
            rows = [time_kernel(kind, shape, cfg) for cfg in sweep_space(kind)]
            rep[kind] = rows
            ok = [r for r in rows if "ms" in r]
            for r in sorted(ok, key=lambda r: r["ms"]):
                print(f"  {kind:5s} {str(tuple(r['config'])):20s} {r['ms']:.4f} ms {r.get('tflops', 0):6.1f} TFLOP/s",
                      flush=True)
            if ok:
                best[kind] = fa.KernelConfig(*min(ok, key=lambda r: r["ms"])["config"])
        overrides[(d, s)] = best
        use_configs({(d, s): best})
        rep["best"] = {kind: list(vars(c).values()) for kind, c in best.items()}
        rep["best_end_to_end"] = _end_to_end(shape)
        print(f"{shape}: defaults {json.dumps(rep['defaults'])}\n  best {rep['best']} -> {rep['best_end_to_end']} "
              f"({time.time() - t0:.0f} s)", flush=True)
        report[str(shape)] = rep
    return report, overrides


def _wait_for(path: str | None, limit_s: float) -> None:
    """Wait (up to limit_s) until `path` exists: GPU tests running beside the compile phase must end before timing."""
    t0 = time.time()
    while path and not os.path.exists(path) and time.time() - t0 < limit_s:
        time.sleep(0.5)
    if path:
        print(f"waited {time.time() - t0:.0f} s for {path} (exists: {os.path.exists(path)})", flush=True)


def kernel_resources() -> dict:
    """Registers, spills and shared memory of every compiled variant of our kernels (best effort)."""
    fa = importlib.import_module("igpt.kernels.flash_attention")
    out: dict = {}
    for name in ("_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_kernel"):
        try:
            for cache, *_ in getattr(fa, name).device_caches.values():
                for key, ck in cache.items():
                    meta = ck.metadata
                    out.setdefault(name, []).append({
                        "regs": ck.n_regs, "spills": ck.n_spills, "shared": meta.shared,
                        "warps": meta.num_warps, "stages": meta.num_stages, "key": str(key)[-400:],
                    })
        except Exception as exc:  # internal API: report, never fail the benchmark on it
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _ratios(ours: dict, base: dict, kind: str) -> tuple[float, float, float]:
    """Speed of ours over `base` (base ms / our ms): the ratio of the medians and the range of the per-round ratios."""
    nan = float("nan")
    if f"{kind}_ms" not in ours or f"{kind}_ms" not in base:
        return nan, nan, nan
    per_round = [b / o for o, b in zip(ours[f"{kind}_runs"], base[f"{kind}_runs"])]
    return base[f"{kind}_ms"] / ours[f"{kind}_ms"], min(per_round), max(per_round)


def ratio_table(results: dict, ours: str) -> list[str]:
    """Rows of TFLOP/s and speed ratios ours / baseline (median over rounds, with the per-round range)."""
    lines = [f"{'shape':22s} {'ours fwd':>9s} {'ours f+b':>9s} {'FA2 f+b':>8s} {'cuDNN f+b':>9s} {'fwd/FA2':>8s} "
             f"{'fwd/cuDNN':>9s} {'f+b/FA2 (range)':>19s} {'f+b/cuDNN (range)':>19s} {'host ms':>8s} {'cuDNN host':>10s}"]
    for shape, r in results.items():
        o, fa, cu = r.get(ours, {}), r.get("sdpa_flash", {}), r.get("sdpa_cudnn", {})

        def val(x, key):
            return x.get(key, float("nan"))

        def ranged(base):
            mid, lo, hi = _ratios(o, base, "fwd_bwd")
            return f"{mid:5.2f} ({lo:.2f}-{hi:.2f})"

        lines.append(
            f"{shape:22s} {val(o, 'fwd_tflops'):9.1f} {val(o, 'fwd_bwd_tflops'):9.1f} {val(fa, 'fwd_bwd_tflops'):8.1f} "
            f"{val(cu, 'fwd_bwd_tflops'):9.1f} {_ratios(o, fa, 'fwd')[0]:8.2f} {_ratios(o, cu, 'fwd')[0]:9.2f} "
            f"{ranged(fa):>19s} {ranged(cu):>19s} {val(o, 'host_issue_ms'):8.3f} {val(cu, 'host_issue_ms'):10.3f}"
        )
    return lines


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, path)


def write_table(report: dict, path: Path) -> dict:
    """The auto table of `report` merged into the one at `path` (its other devices' entries are kept)."""
    table = merge(load_entries(path), table_entries(report))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dumps(table), path)
    return table


def print_choices(table: dict) -> None:
    """What attn_backend=auto picks per signature of the table, and how far ours is from the fastest."""
    for e in table["entries"]:
        ms = e["fwd_bwd_ms"]
        gap = f"; ours {ms[e['best']] / ms['triton']:.2f}x its speed" if "triton" in ms and e["best"] != "triton" else ""
        print(f"auto: {e['device']} {e['dtype']} D={e['head_dim']} S={e['seq_len']} "
              f"{'causal' if e['causal'] else 'full'} -> {e['best']}{gap}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.json"))
    ap.add_argument("--autotune", action="store_true", help="also time our kernel with IGPT_FLASH_AUTOTUNE=1")
    ap.add_argument("--precompile", type=int, default=0, metavar="N",
                    help="compile the autotuning (or --sweep) candidates in N processes first")
    ap.add_argument("--shapes", default=None, help="B,H,S,D;B,H,S,D;... (default: SHAPES, the iGPT and recipe shapes)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per shape (median and range)")
    ap.add_argument("--table", type=Path, default=None,
                    help="the attn_backend=auto table to update (default: pretrain/attention_table.json, the package data)")
    ap.add_argument("--table-from", type=Path, default=None, metavar="RESULTS",
                    help="only write the table from an earlier report of this benchmark (no GPU needed)")
    ap.add_argument("--sweep", action="store_true", help="tune the backward kernels at SWEEP_SHAPES first, then use the best")
    ap.add_argument("--wait-for", default=None, help="wait (up to --wait-limit s) for this file before timing anything")
    ap.add_argument("--wait-limit", type=float, default=90.0)
    ap.add_argument("--deadline", type=float, default=float("inf"), help="skip shapes once this many seconds have passed")
    args = ap.parse_args()
    table = args.table or DEFAULT_TABLE
    if args.table_from:
        print_choices(write_table(json.loads(args.table_from.read_text()), table))
        print(f"wrote {table}")
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]

    impls = {"ours": _ours(False)}
    if args.autotune:
        impls["ours_autotune"] = _ours(True)
    impls["sdpa_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
    impls["sdpa_cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)

    t0 = time.time()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "dtype": "bfloat16",
        "causal": True,
        "flops": "forward 2*B*H*S^2*D (causal), forward+backward 3.5x",
        "error": "relative L2 error vs float32 reference on batch element 0",
    }
    if args.sweep:
        if args.precompile:
            precompile_sweep(SWEEP_SHAPES, shapes, args.precompile)
        _wait_for(args.wait_for, args.wait_limit)
        report["sweep"], overrides = sweep(SWEEP_SHAPES)
        report["sweep_best"] = {f"D={d} S={s}": {k: str(c) for k, c in cfg.items()} for (d, s), cfg in overrides.items()}
        write_json(report, args.out)
    elif args.autotune and args.precompile:
        precompile(sorted({s[3] for s in shapes}), args.precompile)
        _wait_for(args.wait_for, args.wait_limit)
    else:
        if args.precompile:  # the default configs of every shape, in parallel processes
            precompile_sweep([], shapes, args.precompile)
        _wait_for(args.wait_for, args.wait_limit)
    fa = _fa()
    results: dict = {}
    report["results"] = results
    for shape in shapes:
        if time.time() - t0 > args.deadline:
            print(f"deadline: skipping {shape}", flush=True)
            continue
        results[str(shape)] = run_shape(shape, impls, args.repeats)
        results[str(shape)]["configs"] = {k: str(c) for k, c in fa.select_configs(
            shape[3], shape[2], torch.bfloat16, torch.device("cuda")).items()}
        report["wall_s"] = time.time() - t0
        write_json(report, args.out)
        write_table(report, table)
        print(ratio_table({str(shape): results[str(shape)]}, "ours")[-1], flush=True)  # the table, row by row
    report["autotuned_configs"] = tuned_configs()
    report["kernel_resources"] = kernel_resources()
    report["wall_s"] = time.time() - t0
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
    write_json(report, args.out)
    print_choices(write_table(report, table))
    print(f"wrote {args.out} and {table}")


if __name__ == "__main__":
    main()
