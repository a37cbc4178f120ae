"""Palettes and quantisation: exactness against brute force, ties, caching, k-means, round trips."""
from __future__ import annotations

import numpy as np
import pytest

from igpt.data_pipeline.io import file_sha256
from igpt.data_pipeline.palette import fit_kmeans_palette, load_palette, save_palette, uniform9_palette
from igpt.data_pipeline.quantize import Quantizer, build_lut, dequantize, lut_cache_path, quantize_bruteforce


def test_uniform9_is_the_9bit_cube():
    p = uniform9_palette()
    assert p.shape == (512, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 512
    assert sorted(set(p[:, 0])) == [0, 36, 73, 109, 146, 182, 219, 255]
    assert tuple(p[0]) == (0, 0, 0) and tuple(p[511]) == (255, 255, 255)
    assert tuple(p[1 * 64 + 2 * 8 + 3]) == (36, 73, 109)


def test_save_load_identity_is_file_sha(tmp_path):
    p = uniform9_palette()
    sha = save_palette(p, tmp_path / "palette.npy")
    loaded, sha2 = load_palette(tmp_path / "palette.npy")
    assert np.array_equal(loaded, p) and sha == sha2 == file_sha256(tmp_path / "palette.npy")
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(FileNotFoundError, match="palette file not found"):
        load_palette(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match=r"\(K, 3\) uint8"):
        save_palette(p.astype(np.int32), tmp_path / "bad.npy")


def _palettes():
    rng = np.random.default_rng(1)
    clustered = np.clip(rng.normal(128, 25, (512, 3)), 0, 255).astype(np.uint8)
    dups = rng.integers(0, 256, (64, 3), dtype=np.uint8).repeat(8, axis=0)[rng.permutation(512)]  # many exact ties
    coarse = (rng.integers(0, 4, (512, 3)) * 85).astype(np.uint8)  # lattice: equidistant colours everywhere
    return {"uniform9": uniform9_palette(), "random": rng.integers(0, 256, (512, 3), dtype=np.uint8),
            "clustered": clustered, "duplicates": dups, "lattice": coarse, "tiny": np.array([[0, 0, 0], [255, 255, 255]], np.uint8)}


@pytest.mark.parametrize("name", list(_palettes()))
def test_lut_is_bit_exact_with_brute_force(name):
    palette = _palettes()[name]
    rng = np.random.default_rng(2)
    colours = rng.integers(0, 256, (30_000, 3), dtype=np.uint8)
    # plus every colour on a coarse grid and midpoints between centres (where ties happen)
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 17)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.uint8)
    a, b = palette[rng.integers(0, len(palette), 5000)], palette[rng.integers(0, len(palette), 5000)]
    mids = ((a.astype(int) + b) // 2).astype(np.uint8)
    colours = np.concatenate([colours, grid, mids])
    q = Quantizer(palette)
    got = q.quantize(colours)
    assert got.dtype == np.uint16
    assert np.array_equal(got, quantize_bruteforce(colours, palette))


def test_ties_go_to_lowest_index():
    palette = np.array([[10, 10, 10], [0, 0, 0], [20, 20, 20], [10, 10, 10]], np.uint8)
    q = Quantizer(palette)
    assert q.quantize(np.array([[10, 10, 10]], np.uint8))[0] == 0  # duplicate centre 3 loses
    assert q.quantize(np.array([[5, 5, 5]], np.uint8))[0] == 0  # equidistant from 0 and 1 -> 0
    assert q.quantize(np.array([[15, 15, 15]], np.uint8))[0] == 0  # equidistant from 0 and 2 -> 0


def test_quantize_keeps_shape_and_checks_input():
    q = Quantizer(uniform9_palette())
    img = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    assert q.quantize(img).shape == (2, 5, 7)
    with pytest.raises(ValueError, match="uint8"):
        q.quantize(img.astype(np.float32))


def test_round_trip_and_dequantize():
    palette = uniform9_palette()
    tokens = np.random.default_rng(0).integers(0, 512, (4, 16, 16))
    rgb = dequantize(tokens, palette)
    assert rgb.shape == (4, 16, 16, 3) and rgb.dtype == np.uint8
    assert np.array_equal(Quantizer(palette).quantize(rgb), tokens)  # distinct centres quantise to themselves
    with pytest.raises(ValueError, match="outside"):
        dequantize(np.array([512]), palette)


def test_lut_cache_beside_palette(tmp_path):
    path = tmp_path / "palette.npy"
    sha = save_palette(uniform9_palette(), path)
    q1 = Quantizer.from_file(path)
    cache = lut_cache_path(path, sha)
    assert cache.is_file() and cache.name == f"palette.{sha[:16]}.lut.npy"
    mtime = cache.stat().st_mtime_ns
    q2 = Quantizer.from_file(path)
    assert cache.stat().st_mtime_ns == mtime and np.array_equal(q1.lut, q2.lut)
    cache.write_bytes(b"garbage")  # a damaged cache is rebuilt, never trusted
    assert np.array_equal(Quantizer.from_file(path).lut, q1.lut)


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.integers(20, 236, (8, 3))
    pix = centres[rng.integers(0, 8, 20_000)] + rng.integers(-3, 4, (20_000, 3))
    return centres, pix.clip(0, 255).astype(np.uint8)


def test_kmeans_finds_clusters_and_is_reproducible():
    centres, pix = _blobs()
    p1 = fit_kmeans_palette(pix, k=8, seed=0, iters=50, device="cpu")
    p2 = fit_kmeans_palette(pix, k=8, seed=0, iters=50, device="cpu")
    assert p1.shape == (8, 3) and p1.dtype == np.uint8
    assert np.array_equal(p1, p2)
    # every true centre has a fitted centre within 2 levels per channel
    d = np.abs(p1[:, None, :].astype(int) - centres[None]).max(-1)
    assert (d.min(0) <= 2).all()


def test_kmeans_reseeds_dead_clusters():
    # 600 distinct colours, 512 centres: with re-seeding no centre is left without points, so all are distinct
    rng = np.random.default_rng(3)
    colours = rng.choice(256**3, 600, replace=False)
    pix = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], 1).astype(np.uint8)
    pix = pix[rng.integers(0, 600, 30_000)]
    p = fit_kmeans_palette(pix, k=512, seed=0, iters=20, device="cpu")
    assert len({tuple(c) for c in p}) == 512
    q = Quantizer(p).quantize(pix)
    assert len(np.unique(q)) == 512  # every token is used


def test_kmeans_on_cifar_pixels(cifar_dir):
    from igpt.data_pipeline.fit import sample_pixels

    pix = sample_pixels([str(cifar_dir / "cifar10-train-000000.tar")], 32, max_images=300, pixels_per_image=64)
    assert pix.shape == (300 * 64, 3)
    p = fit_kmeans_palette(pix, k=64, seed=0, iters=10, device="cpu")
    q = Quantizer(p)
    err_km = np.abs(dequantize(q.quantize(pix), p).astype(int) - pix).mean()
    err_u = np.abs(dequantize(Quantizer(uniform9_palette()).quantize(pix), uniform9_palette()).astype(int) - pix).mean()
    assert err_km < 12 and err_u < 12


@pytest.mark.slow
def test_lut_exact_over_the_whole_colour_cube():
    """Every one of the 2^24 colours for a clustered, k-means-like palette (about 15 s on 2 cores).

    Reference: float32 matmul-argmin of |c|² - 2 x·c as one matmul ([x, 1] against [-2c, |c|²]), which is
    exact here (every partial sum is an integer below 2^24 in magnitude) and breaks ties towards the first index
    like the int64 brute force (checked on a sample). Chunks of 2,048 colours keep the scores in cache.
    """
    import torch

    palette = _palettes()["clustered"]
    lut = build_lut(palette)
    pal = torch.from_numpy(palette).float()
    scorer = torch.cat([-2.0 * pal.T, (pal * pal).sum(1)[None]])  # (4, K)
    codes = torch.arange(1 << 24)
    ref = torch.empty(1 << 24, dtype=torch.int64)
    step = 1 << 11
    for s in range(0, 1 << 24, step):
        code = codes[s : s + step]
        rgb = torch.stack([code & 255, (code >> 8) & 255, code >> 16, torch.ones_like(code)], 1)
        torch.argmin(rgb.float() @ scorer, 1, out=ref[s : s + step])
    wrong = np.flatnonzero(lut != ref.numpy())
    assert wrong.size == 0, f"{wrong.size} colours differ, the first codes {wrong[:5].tolist()}"
    rgb = torch.stack([codes[:4096] & 255, (codes[:4096] >> 8) & 255, codes[:4096] >> 16], 1).numpy().astype(np.uint8)
    assert np.array_equal(ref[:4096].numpy(), quantize_bruteforce(rgb, palette))
