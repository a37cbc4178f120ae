"""The training loop: iGPT on token shards through a DeepSpeed engine, on one CPU or many GPUs.

``train(cfg, resume)`` runs in every rank. Per optimizer step: set the learning rate (a pure
function of the step), run ``grad_accum`` micro-batches through ``engine.backward``/``engine.step``,
append the global loss to ``RUN_DIR/losses.jsonl`` (rank 0), log to MLflow every ``log_every``
steps, validate every ``val_every``, log sample grids every ``sample_every`` and checkpoint every
``checkpoint.every`` steps, at the end and on SIGTERM/SIGUSR1 (then exit with the requeue code).

Non-finite loss: the loss is all-reduced before backward, so every rank sees the same verdict.
If the first micro-batch of a step is non-finite the whole step is skipped (no backward, no
update; its data is consumed). A non-finite later micro-batch (``grad_accum`` > 1) is propagated
so DeepSpeed's overflow check discards the update; where DeepSpeed applies it anyway (ZeRO-0/3
in fp32) the run stops with an error. After ``train.max_nonfinite`` skipped steps in a row the
run stops with ``NonFiniteLossError``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain import checkpoint as ckpt
from pretrain.config import MODEL_FIELDS, igpt_config, save_config
from pretrain.deepspeed_config import build_deepspeed_config, resolve_device
from pretrain.distributed import setup_env, shutdown
from pretrain.model import IGPT
from pretrain.schedule import lr_at
from pretrain.tracking import memory_gb, mfu, open_tracker, peak_flops

LOSSES_FILE = "losses.jsonl"
# Fault injection for the exact-resume test: SIGKILL this process group right after the
# checkpoint of the given step is complete (a real kill -9 at a known point).
FAULT_KILL_ENV = "IGPT_FAULT_KILL_AFTER_CHECKPOINT"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class Preempted(Exception):
    """A preemption signal was handled: a checkpoint was written and the run should exit to be requeued."""


class LossModule(nn.Module):
    """What the engine wraps: ``forward(tokens, generator)`` is the model's training loss."""

    def __init__(self, model: IGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.model.loss(tokens, generator=generator)


def resolve_model_section(cfg: dict, manifest: dict) -> None:
    """Fill the model section from the preset and the data (n_ctx = resolution², vocab from the manifest)."""
    m = cfg["model"]
    if m.get("n_ctx") is None:
        m["n_ctx"] = manifest["resolution"] ** 2
    if m.get("vocab_size") is None:
        m["vocab_size"] = manifest["vocab_size"]
    resolved = igpt_config(cfg)
    for k in MODEL_FIELDS:
        m[k] = getattr(resolved, k)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _all_reduce_mean(value: Tensor, world: int) -> Tensor:
    value = value.detach().float().reshape(1).clone()
    if world > 1:
        dist.all_reduce(value)
    return value / world


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


class Trainer:
    """One training run in one rank; ``run()`` returns the process exit code."""

    def __init__(self, cfg: dict, resume: str | None = None) -> None:
        import deepspeed
        from deepspeed.utils import logger as ds_logger
        from data_pipeline.loader import TokenStream
        from data_pipeline.manifest import load_manifest
        from data_pipeline.palette import load_palette

        ds_logger.setLevel(logging.WARNING)  # keep the one-line progress log readable
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)
        self.env = setup_env()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = resolve_device(cfg)
        if self.device == "cuda":
            torch.cuda.set_device(self.env.local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo")

        self.cfg = cfg
        self.run_dir = Path(cfg["train"]["run_dir"])
        data_dir = cfg["data"]["dir"]
        self.manifest = load_manifest(data_dir)
        self.palette, self.palette_sha256 = load_palette(Path(data_dir) / self.manifest["palette_file"])
        if self.palette_sha256 != self.manifest["palette_sha256"]:
            raise ValueError(f"palette beside {data_dir} has sha256 {self.palette_sha256}, the manifest says "
                             f"{self.manifest['palette_sha256']}")
        resolve_model_section(cfg, self.manifest)

        self.model_cfg = igpt_config(cfg)
        with torch.device("meta"):  # shapes only: the counts without memory (ZeRO-3 partitions the real ones)
            counted = IGPT(self.model_cfg)
        self.num_params, self.flops_per_token = counted.num_params(), counted.flops_per_token()
        self.ds_config = build_deepspeed_config(cfg, self.device)
        zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        _seed_everything(cfg["train"]["seed"])  # identical initial weights on every rank
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=zero3):
            self.model = IGPT(self.model_cfg)  # ZeRO-3: each rank materialises only its partition
        if zero3:  # the constructor's init ran on partitioned (empty) tensors: redo it on rank 0's full copy
            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0):
                self.model.reset_parameters()
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg["optim"]["lr"],
                                     betas=tuple(cfg["optim"]["betas"]), eps=cfg["optim"]["eps"],
                                     weight_decay=cfg["optim"]["weight_decay"],
                                     fused=self.device == "cuda" or None)  # one kernel per step on GPU
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=LossModule(self.model), optimizer=optimizer,
                                                                 config=self.ds_config)
        self.zero_stage = self.engine.zero_optimization_stage()
        if cfg["train"]["compile"]:
            self.engine.compile()
        if self.zero_stage == 3:
            # The top-level forward slices wpe.weight directly instead of calling the wpe module.
            deepspeed.zero.register_external_parameter(self.model, self.model.wpe.weight)
        _seed_everything(cfg["train"]["seed"] + 1000 * self.rank)  # per-rank streams from here on

        t = cfg["train"]
        self.stream = TokenStream(data_dir, cfg["data"]["train_split"], t["micro_batch_size"], rank=self.rank,
                                  world_size=self.world, num_workers=cfg["data"]["num_workers"],
                                  seed=cfg["data"]["seed"], shuffle_buffer=cfg["data"]["shuffle_buffer"])
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_total = 0
        self.grad_norm = float("nan")  # of the last applied step, where DeepSpeed keeps none
        self.resumed_from: str | None = None
        if resume is not None:
            self._resume(resume)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        self.tracker = open_tracker(cfg, self.run_dir, self.rank)
        self.peak = peak_flops(self.device, cfg["logging"]["peak_tflops"])
        self.preempt = ckpt.PreemptionFlag()

    # ------------------------------------------------------------ resume
    def _resume(self, resume: str) -> None:
        """Load the newest complete checkpoint (``auto``) or the given tag dir; all ranks load the same one."""
        check = self.cfg["checkpoint"]["verify_sha256"]
        candidates: list[Path] = []
        if resume != "auto":  # every rank checks, so a bad path fails everywhere and no rank waits
            ckpt.verify(Path(resume), check)
            candidates = [Path(resume)]
        elif self.rank == 0:  # rank 0 chooses (warning once about skipped tags); every rank loads its choice
            candidates = ckpt.find_resumable(self.run_dir, check)
        candidates = ckpt.gather_per_rank([str(c) for c in candidates])[0]
        if not candidates:
            _log(self.rank, f"resume auto: no complete checkpoint in {self.run_dir}, starting from step 0")
            return
        client = ckpt.load(self.engine, Path(candidates[0]))
        if client["palette_sha256"] != self.palette_sha256:
            raise ValueError(f"checkpoint {candidates[0]} was trained with palette {client['palette_sha256']}, "
                             f"the data uses {self.palette_sha256}")
        changed = [k for k in MODEL_FIELDS if client["config"]["model"][k] != self.cfg["model"][k]]
        if changed:
            raise ValueError(f"checkpoint {candidates[0]} has a different model ({changed}); cannot resume")
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.nonfinite_total = client.get("nonfinite_total", 0)
        self.stream.load_state_dict(client["loader_states"][self.rank])
        self.resumed_from = candidates[0]
        _log(self.rank, f"resumed from {candidates[0]} at step {self.step} ({self.tokens_seen} tokens seen)")

    # ------------------------------------------------------------ pieces
    def _client_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_total": self.nonfinite_total,
                "config": self.cfg, "palette_sha256": self.palette_sha256}

    def save_checkpoint(self) -> Path:
        t0 = time.time()
        path = ckpt.save(self.engine, self.run_dir, self.step, self._client_state(),
                         loader_state=self.stream.state_dict(), keep_last=self.cfg["checkpoint"]["keep_last"])
        _log(self.rank, f"checkpoint {path} ({time.time() - t0:.1f} s)")
        if os.environ.get(FAULT_KILL_ENV) == str(self.step) and self.rank == 0:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return path

    def _gathered(self):
        """Context with the full parameters on every rank (ZeRO-3), for sampling outside forward()."""
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    @torch.no_grad()
    def validate(self) -> float:
        """Mean nats/token over ``val_batches`` batches per rank of the validation split (rank-sharded)."""
        from data_pipeline.loader import iterate_split

        t = self.cfg["train"]
        self.engine.eval()
        total, count = torch.zeros(1, device=self.device), torch.zeros(1, device=self.device)
        batches = iterate_split(self.cfg["data"]["dir"], self.cfg["data"]["val_split"], t["micro_batch_size"])
        mine = [b for i, b in zip(range(t["val_batches"] * self.world), batches) if i % self.world == self.rank]
        n_batches = torch.tensor([len(mine)], device=self.device)
        if self.world > 1:  # every rank must run the same number of forwards (ZeRO-3 gathers in them)
            dist.all_reduce(n_batches, op=dist.ReduceOp.MIN)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg["train"]["seed"])
        for batch in mine[: int(n_batches)]:
            tokens = batch["tokens"].to(self.device)
            loss = self.engine(tokens, gen)
            total += loss.detach().float() * tokens.numel()
            count += tokens.numel()
        self.engine.train()
        if self.world > 1:
            both = torch.cat([total, count])
            dist.all_reduce(both)
            total, count = both[:1], both[1:]
        return float(total / count) if count.item() else float("nan")

    @torch.no_grad()
    def sample_grids(self) -> None:
        """Unconditional samples and bottom-half completions of validation images, as PNG artifacts (rank 0)."""
        from data_pipeline.grid import chunk_rows, image_grid
        from data_pipeline.loader import iterate_split
        from data_pipeline.quantize import dequantize

        if self.model_cfg.objective != "ar":
            return
        t = self.cfg["train"]
        n, res = t["sample_count"], self.manifest["resolution"]
        gen = torch.Generator(device=self.device).manual_seed(t["seed"] + self.step)
        val = next(iter(iterate_split(self.cfg["data"]["dir"], self.cfg["data"]["val_split"], n)))["tokens"]
        val = val.to(self.device)
        half = (res // 2) * res
        self.engine.eval()
        with self._gathered():
            uncond = self.model.generate(n, temperature=t["sample_temperature"], generator=gen)
            completed = self.model.generate(prefix=val[:, :half], n_tokens=res * res,
                                            temperature=t["sample_temperature"], generator=gen)
        self.engine.train()
        if self.rank != 0:
            return

        def images(tokens: Tensor) -> np.ndarray:
            return dequantize(tokens.cpu().numpy().reshape(-1, res, res), self.palette)

        def grid(rgb: np.ndarray) -> np.ndarray:  # n images per row, 4x upscaled
            return image_grid(chunk_rows(rgb, n), scale=4)

        self.tracker.log_image(grid(images(uncond)), f"samples/step_{self.step:08d}_uncond.png")
        pairs = np.concatenate([images(val), images(completed)])  # originals above their completions
        self.tracker.log_image(grid(pairs), f"samples/step_{self.step:08d}_completions.png")

    # ------------------------------------------------------------ one optimizer step
    def _grad_norm_before_step(self) -> float:
        """The global gradient norm where DeepSpeed records none: ZeRO-0 in fp32 with a torch optimizer clips
        through torch and keeps no norm. Elsewhere (bf16, ZeRO-1/2/3) DeepSpeed records it: NaN, unused."""
        if self.zero_stage != 0 or self.ds_config["bf16"]["enabled"]:
            return float("nan")
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def train_step(self, batches: Iterator[dict]) -> tuple[float, bool]:
        """Run one optimizer step; return (mean global loss, whether it was skipped as non-finite)."""
        t = self.cfg["train"]
        lr = lr_at(self.step, lr=self.cfg["optim"]["lr"], warmup_steps=self.cfg["optim"]["warmup_steps"],
                   total_steps=t["steps"], min_lr=self.cfg["optim"]["min_lr"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        losses, skipped = [], False
        for micro in range(t["grad_accum"]):
            tokens = next(batches)["tokens"].to(self.device, non_blocking=True)
            self.tokens_seen += tokens.numel() * self.world
            if skipped and micro > 0 and not losses:
                continue  # the step was skipped at its first micro-batch: consume the data only
            gen = torch.Generator(device=self.device).manual_seed(
                (t["seed"] * 1_000_003 + self.step * 1009 + micro) * 131 + self.rank)
            loss = self.engine(tokens, gen)
            mean = _all_reduce_mean(loss, self.world).item()
            if not math.isfinite(mean):
                skipped = True
                if micro == 0:
                    continue
            losses.append(mean)
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                self.grad_norm = self._grad_norm_before_step()
            self.engine.step()
        if skipped and losses and self.engine.was_step_applied():
            raise NonFiniteLossError(
                f"step {self.step}: non-finite loss inside a gradient-accumulation window and DeepSpeed "
                f"(ZeRO-{self.zero_stage}, {'bf16' if self.ds_config['bf16']['enabled'] else 'fp32'}) applied "
                "the update; parameters may be invalid. Lower optim.lr or use train.grad_accum=1.")
        return (float("nan") if skipped else sum(losses) / len(losses)), skipped

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        t, c = self.cfg["train"], self.cfg["checkpoint"]
        tokens_per_step = t["micro_batch_size"] * t["grad_accum"] * self.world * self.model_cfg.n_ctx
        _log(self.rank, f"iGPT {self.num_params / 1e6:.2f}M params | {self.world} rank(s) on {self.device} | "
                        f"ZeRO-{self.zero_stage} | {tokens_per_step} tokens/step | steps {self.step}→{t['steps']}")
        batches = iter(self.stream)
        losses_path = self.run_dir / LOSSES_FILE
        consecutive_nonfinite = 0
        window_loss, window_steps, window_seconds, window_tokens = 0.0, 0, 0.0, 0
        status = "FAILED"
        try:
            with open(losses_path, "a") if self.rank == 0 else nullcontext() as losses_file:
                while self.step < t["steps"]:
                    t0 = time.perf_counter()
                    loss, skipped = self.train_step(batches)
                    window_seconds += time.perf_counter() - t0
                    grad_norm = self.engine.get_global_grad_norm()
                    grad_norm = self.grad_norm if grad_norm is None else float(grad_norm)
                    grad_norm = float("nan") if skipped else grad_norm
                    self.step += 1
                    if skipped:
                        consecutive_nonfinite += 1
                        self.nonfinite_total += 1
                        _log(self.rank, f"step {self.step}: non-finite loss, step skipped "
                                        f"({consecutive_nonfinite} in a row)")
                    else:
                        consecutive_nonfinite = 0
                        window_loss += loss
                        window_steps += 1
                    window_tokens += tokens_per_step
                    if self.rank == 0:
                        losses_file.write(json.dumps({"step": self.step, "loss": loss, "lr": self.lr,
                                                      "grad_norm": grad_norm, "skipped": skipped}) + "\n")
                        losses_file.flush()
                    if consecutive_nonfinite >= t["max_nonfinite"]:
                        raise NonFiniteLossError(f"{consecutive_nonfinite} consecutive steps with a non-finite "
                                                 f"loss (up to step {self.step}); stopping. Lower optim.lr, "
                                                 "raise optim.warmup_steps or check the data.")
                    if self.step % t["log_every"] == 0 or self.step == t["steps"]:
                        self._log_window(window_loss, window_steps, window_tokens, window_seconds, grad_norm)
                        window_loss, window_steps, window_seconds, window_tokens = 0.0, 0, 0.0, 0
                    if self.step % t["val_every"] == 0 or self.step == t["steps"]:
                        val = self.validate()
                        self.tracker.log_metrics({"val_loss": val, "val_bpp": val / math.log(2)}, self.step)
                        _log(self.rank, f"step {self.step} | val loss {val:.4f} ({val / math.log(2):.3f} bpp)")
                    if self.step % t["sample_every"] == 0:
                        self.sample_grids()
                    if self.step % c["every"] == 0 or self.step == t["steps"]:
                        self.save_checkpoint()
                    if self.step < t["steps"] and self.preempt.requested():
                        signame = signal.Signals(self.preempt.signum).name if self.preempt.signum else "signal"
                        _log(self.rank, f"step {self.step}: preemption ({signame}) – saving a checkpoint")
                        if self.step % c["every"] != 0:
                            self.save_checkpoint()
                        raise Preempted()
            status = "FINISHED"
            return 0
        except Preempted:
            status = "KILLED"
            self.tracker.set_tags({"preempted_at_step": self.step})
            return c["preempt_exit_code"]
        finally:
            self.tracker.close(status)
            self.preempt.restore()

    def _log_window(self, loss_sum: float, n: int, tokens: int, seconds: float, grad_norm: float) -> None:
        loss = loss_sum / n if n else float("nan")
        tok_s = tokens / max(seconds, 1e-9)
        util = mfu(tok_s, self.flops_per_token, self.world, self.peak)
        mem = memory_gb(self.device)
        self.tracker.log_metrics({"loss": loss, "bpp": loss / math.log(2), "lr": self.lr, "grad_norm": grad_norm,
                                  "tokens_per_s": tok_s, "mfu": util, "memory_gb": mem,
                                  "tokens_seen": self.tokens_seen, "nonfinite_steps": self.nonfinite_total},
                                 self.step)
        _log(self.rank, f"step {self.step:>6}/{self.cfg['train']['steps']} | loss {loss:.4f} "
                        f"({loss / math.log(2):.3f} bpp) | lr {self.lr:.2e} | gnorm {grad_norm:.3f} | "
                        f"{tok_s / 1e3:.1f}k tok/s | MFU {100 * util:.2f}% | mem {mem:.2f} GB | "
                        f"skipped {self.nonfinite_total}")


def train(cfg: dict, resume: str | None = None) -> int:
    """Train with the resolved config ``cfg``; the exit code (0, or the preemption requeue code)."""
    trainer = Trainer(cfg, resume)
    try:
        code = trainer.run()
    finally:
        sys.stdout.flush()
    # Only on a clean return: after an error the peers may never reach the shutdown barrier.
    trainer.engine.destroy()  # removes ZeRO hooks and frees buffers before the group goes
    shutdown()
    return code
