"""The training loop: iGPT on token shards through a DeepSpeed engine, on one CPU or many GPUs.

``train(cfg, resume)`` runs in every rank. Per optimizer step: set the learning rate (a pure
function of the step), run ``grad_accum`` micro-batches through ``engine.backward``/``engine.step``
in the precision mode of ``igpt.pretrain.precision``, append the global loss to ``RUN_DIR/losses.jsonl``
(rank 0), log every ``log_every`` steps, validate every ``val_every`` (in the evaluation's
numerics), log sample grids every ``sample_every`` and checkpoint every ``checkpoint.every`` steps,
at the end and on preemption (``igpt.pretrain.checkpointer``; then exit with the requeue code). The
pieces: ``igpt.pretrain.state.TrainState`` (what a checkpoint carries of the loop), ``igpt.pretrain.checkpointer``
(cadence, retention, resume choice and checks, preemption), ``igpt.pretrain.metrics`` (the per-step
records and the log window), ``igpt.pretrain.validation.Validator`` (the validation loss and the sample
grids).

No host sync per step: the step's loss, its non-finite verdict, the gradient norm and the
preemption flag stay on the device and come back through ``igpt.pretrain.metrics.StepRecords`` one
step late on CUDA (at once on CPU), and in full at every log, validation or checkpoint boundary.
Per step one all-reduce carries the loss and the preemption flag of every rank.

Non-finite steps: when the global loss (or, where the loop clips, the gradient norm) is not
finite, the update is skipped on the device: the fused Adam gets the verdict as its ``found_inf``
and leaves weights, moments and step count untouched (DeepSpeed's own overflow check agrees where
it has one). A skipped step is recorded with a NaN loss and counted; after ``train.max_nonfinite``
skipped steps in a row the run stops with ``NonFiniteLossError``.

``train.init_from`` starts a fresh run from a release's weights (``igpt.pretrain.init_from``; new optimizer and
schedule); when ``--resume`` finds a checkpoint, the checkpoint wins and the log says so. ``trust_checkpoint``
(``--trust-checkpoint``) lets both load a checkpoint that is not the user's own (``igpt.pretrain.checkpoint.check_trusted``).

Preemption: every rank acts on the same step's all-reduced flag, so all of them stop, save the
same checkpoint and exit with ``checkpoint.preempt_exit_code`` within a step of the signal.
"""
from __future__ import annotations

import json
import logging
import random
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from igpt.data_pipeline.loader import TokenStream
from igpt.data_pipeline.manifest import Manifest
from igpt.pretrain.checkpoint import CheckpointSaveError, ResumePlan
from igpt.pretrain.checkpointer import Checkpointer
from igpt.pretrain.config import ConfigError, TrainConfig, save_config
from igpt.pretrain.deepspeed_config import build_deepspeed_config, loop_clips_gradients, resolve_device
from igpt.pretrain.deepspeed_ops import load_shm_op
from igpt.pretrain.distributed import setup_env, shutdown
from igpt.pretrain.host_memory import keep_freed_heap
from igpt.pretrain.init_from import load_init_state
from igpt.pretrain.metrics import MetricsWindow, StepRecord, StepRecords
from igpt.pretrain.models import Model, build_model
from igpt.pretrain.precision import eval_autocast, resolve_precision, training_autocast
from igpt.pretrain.schedule import lr_at
from igpt.pretrain.state import TrainState
from igpt.pretrain.tracking import memory_gb, open_tracker, peak_flops
from igpt.pretrain.validation import Validator
from igpt.pretrain.wall_time import WallTime

LOSSES_FILE = "losses.jsonl"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


# Errors that every rank raises at the same step (from an agreed save result or the all-reduced loss).
STOPPED_ON_EVERY_RANK = (CheckpointSaveError, NonFiniteLossError)


class Preempted(Exception):
    """A preemption signal was handled: a checkpoint was written and the run should exit to be requeued."""


class LossModule(nn.Module):
    """What the engine wraps: ``forward(tokens, generator)`` is the model's loss in the training
    precision; with ``evaluate=True`` in the evaluation numerics (see ``igpt.pretrain.precision``); ``order``, a
    patch model's random patch order (the batch's, from the loader), raster when None."""

    def __init__(self, model: Model, precision: str = "fp32", device: str = "cpu") -> None:
        super().__init__()
        self.model, self.precision, self.device_type = model, precision, device

    def forward(self, tokens: Tensor, generator: torch.Generator | None = None, evaluate: bool = False,
                order: Tensor | None = None) -> Tensor:
        numerics = eval_autocast(self.device_type) if evaluate else training_autocast(self.precision, self.device_type)
        with numerics:
            if order is None:
                return self.model.loss(tokens, generator=generator)
            return self.model.loss(tokens, generator=generator, order=order)


def resolve_model_section(cfg: TrainConfig, manifest: Manifest) -> None:
    """Fill the model's data-given fields (n_ctx = resolution², or (resolution / patch_size)² patches, vocab_size
    from the manifest) and refuse a model that does not fit the data: a patch size that does not divide the
    resolution, a vocabulary smaller than its palette (a token past the embedding table), a context other than its
    sequence length (the model reads and samples whole images)."""
    res, unit = manifest.resolution, cfg.model.unit
    if unit == "patch" and res % cfg.model.patch_size:
        raise ConfigError(f"config key 'model.patch_size' = {cfg.model.patch_size} does not divide the resolution "
                          f"{res} of {cfg.data.dir}")
    seq_len = (res // cfg.model.patch_size) ** 2 if unit == "patch" else res ** 2
    if cfg.model.n_ctx is None:
        cfg.model.n_ctx = seq_len
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = manifest.vocab_size
    if cfg.model.vocab_size < manifest.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size' = {cfg.model.vocab_size} is smaller than the palette of "
                          f"{cfg.data.dir} ({manifest.vocab_size} tokens); set it to null (the data's) or more")
    if cfg.model.n_ctx != seq_len:
        raise ConfigError(f"config key 'model.n_ctx' = {cfg.model.n_ctx} does not fit {cfg.data.dir}: its "
                          f"{res}x{res} images are {seq_len} {'patches' if unit == 'patch' else 'tokens'}; set it to null (the data's) or {seq_len}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device_scalar(value: Tensor | float | None, like: Tensor) -> Tensor:
    """``value`` as a 0-d float tensor on ``like``'s device, without a host sync (None → NaN)."""
    if isinstance(value, Tensor):
        return value.detach().float().reshape(()).to(like.device)
    return torch.full_like(like, float("nan") if value is None else float(value))


class Trainer:
    """One training run in one rank; ``run()`` returns the process exit code."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, trust_checkpoint: bool = False) -> None:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # keep the one-line progress log readable
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)
        self.cfg, self.trust_checkpoint = cfg, trust_checkpoint
        self.run_dir = Path(cfg.train.run_dir)
        self._open_data()  # a model that does not fit the data is refused before any process group starts
        self._init_distributed()
        self.checkpointer = Checkpointer(cfg, self.rank, self.world, self.log)
        self.state = TrainState()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.ds_config = build_deepspeed_config(cfg, self.device)
        stage = self.ds_config["zero_optimization"]["stage"]
        plan = self.checkpointer.plan(resume, stage, trust_checkpoint) if resume else None
        if plan is not None and plan.universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self._build_engine(self._initial_weights(plan))
        _seed_everything(cfg.train.seed + 1000 * self.rank)  # per-rank streams from here on
        self.stream = TokenStream(cfg.data.dir, cfg.data.train_split, cfg.train.micro_batch_size,
                                  rank=self.rank, world_size=self.world, num_workers=cfg.data.num_workers,
                                  seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                  pin_memory=self.device == "cuda", with_keys=cfg.data.record_keys,
                                  hflip=cfg.data.hflip, random_crop=cfg.data.random_crop,
                                  patch_orders=cfg.model.n_ctx if cfg.model.order == "random" else 0)
        if plan is not None:
            self.checkpointer.restore(self.engine, plan, self.palette_sha256, self.state, self.stream)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        self.tracker = open_tracker(cfg, self.run_dir, self.rank)
        self.validator = Validator(cfg, self.engine, self.model, rank=self.rank, world=self.world, device=self.device,
                                   palette=self.palette, tracker=self.tracker, log=self.log,
                                   resolution=self.manifest.resolution)
        self.peak = peak_flops(self.device, cfg.logging.peak_tflops)
        self.consecutive_nonfinite = 0
        self.wall = WallTime()  # the loop's, restarted when it starts
        self.losses_file: Any = None  # RUN_DIR/losses.jsonl, open on rank 0 while run() runs
        self.keys_file: Any = None  # RUN_DIR/data_keys.rankR.jsonl with data.record_keys, open while run() runs

    def log(self, msg: str) -> None:
        """Print on rank 0."""
        if self.rank == 0:
            print(msg, flush=True)

    # ------------------------------------------------------------ set-up
    def _init_distributed(self) -> None:
        import deepspeed

        env = setup_env()
        self.rank, self.world = env.rank, env.world_size
        self.device = resolve_device(self.cfg)
        if self.device == "cuda":
            torch.cuda.set_device(env.local_rank)
        load_shm_op()  # before init_distributed loads it: a build lock left by a killed build would hang it
        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo")

    def _open_data(self) -> None:
        """The token shards' manifest and palette (checked against each other); the model section resolved."""
        from igpt.data_pipeline.token_shards import TokenShards

        shards = TokenShards.open(self.cfg.data.dir)
        self.manifest, self.palette, self.palette_sha256 = shards.manifest, shards.palette, shards.palette_sha256
        resolve_model_section(self.cfg, self.manifest)
        self.model_cfg = self.cfg.model
        with torch.device("meta"):  # shapes only: the counts without memory (ZeRO-3 partitions the real ones)
            counted = build_model(self.model_cfg)
        self.num_params, self.flops_per_token = counted.num_params(), counted.flops_per_token()

    def _initial_weights(self, plan: ResumePlan | None) -> dict[str, Tensor] | None:
        """``train.init_from``'s weights, checked against this run, unless the run resumes a checkpoint."""
        source = self.cfg.train.init_from
        if source is None:
            return None
        if plan is not None:
            self.log(f"init_from: not applied, the run resumes checkpoint {plan.tag_dir} instead of {source}")
            return None
        state = load_init_state(source, self.model_cfg, self.palette_sha256, self.trust_checkpoint)
        self.log(f"init_from: starting from the weights of {source} (fresh optimizer and schedule)")
        return state

    def _build_engine(self, initial: dict[str, Tensor] | None = None) -> None:
        """The model (identical initial weights on every rank: seeded, or ``initial``), the fused Adam and the
        DeepSpeed engine. The weights are in place before DeepSpeed wraps them: its ZeRO and bf16 optimizers
        copy their fp32 master weights from the model then."""
        import deepspeed

        zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        _seed_everything(self.cfg.train.seed)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=zero3):
            self.model = build_model(self.model_cfg, self.palette)  # ZeRO-3: each rank materialises its partition
        if zero3 or initial is not None:  # ZeRO-3: the constructor's init ran on partitioned (empty) tensors
            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0, enabled=zero3):
                if initial is None:
                    self.model.reset_parameters()  # on rank 0's full copy, then partitioned
                else:
                    self.model.load_state_dict(initial, strict=True)
        o = self.cfg.optim
        # Fused: one kernel per step, and it takes the non-finite verdict as a device tensor (found_inf).
        self.adam = torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay, fused=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=LossModule(self.model, self.precision, self.device), optimizer=self.adam, config=self.ds_config)
        self.zero_stage = self.engine.zero_optimization_stage()
        if self.zero_stage == 0 and self.world == 1:  # nothing to average: skip the flatten/all-reduce/copy-back
            self.engine.enable_backward_allreduce = False
        self.loop_clips = loop_clips_gradients(self.zero_stage, self.precision)
        offloaded = self.cfg.deepspeed.offload_optimizer != "none"
        self.optimizer_device = "cpu" if offloaded else self.device  # where the Adam step runs
        if self.cfg.train.compile:
            self.engine.compile()
        if zero3:  # the top-level forward slices wpe.weight directly instead of calling the wpe module
            deepspeed.zero.register_external_parameter(self.model, self.model.wpe.weight)

    # ------------------------------------------------------------ pieces
    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.engine, self.state, self.palette_sha256, self.stream.state_dict())

    # ------------------------------------------------------------ one optimizer step
    def _mask_generator(self, micro: int) -> torch.Generator | None:
        """The BERT objective's mask randomness, a pure function of (seed, step, micro-batch, rank)."""
        if self.model_cfg.objective != "bert":
            return None
        seed = (self.cfg.train.seed * 1_000_003 + self.state.step * 1009 + micro) * 131 + self.rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def _clip_gradients(self) -> Tensor:
        """Global gradient norm (before clipping), clipped to ``optim.grad_clip``, with one foreach pass
        and no host sync. Only where ``loop_clips``: at ZeRO-0 the gradients are whole and already averaged."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, norm, foreach=True)
        return norm

    def train_step(self, batches: Iterator[dict], lr: float) -> Tensor:
        """Run one optimizer step at rate ``lr``; return its record (``igpt.pretrain.metrics.RECORD_FIELDS``) on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.cfg.train.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = next(batches)
            if self.keys_file is not None:
                self.keys_file.write(json.dumps({"step": self.state.step + 1, "epoch": self.stream.epoch,
                                                 "keys": batch["keys"]}) + "\n")
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            self.state.tokens_seen += tokens.numel() * self.world
            order = batch.get("order")
            order = None if order is None else order.to(self.device, non_blocking=True)
            loss = self.engine(tokens, self._mask_generator(micro), order=order)
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro < accum - 1:
                self.engine.step()  # inside the accumulation window: no update
        # One all-reduce for the loss and the preemption flag of every rank.
        stats = torch.stack([loss_sum / accum, torch.full_like(loss_sum, self.checkpointer.preemption_requested)])
        if self.world > 1:
            dist.all_reduce(stats)
        loss, preempt = stats[0] / self.world, stats[1] > 0
        grad_norm = self._clip_gradients() if self.loop_clips else None
        bad = ~torch.isfinite(loss) if grad_norm is None else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        found_inf = bad.float()
        self.adam.found_inf = found_inf.to(self.optimizer_device)
        self.engine.step()
        if grad_norm is None:  # DeepSpeed clipped and kept the norm
            grad_norm = _device_scalar(self.engine.get_global_grad_norm(), loss)
        return torch.stack([torch.where(bad, torch.full_like(loss, float("nan")), loss), found_inf,
                            grad_norm.float(), preempt.float()])

    # ------------------------------------------------------------ the loop
    def _account(self, record: StepRecord, window: MetricsWindow) -> None:
        """Book one step on the host: losses.jsonl, the window, the non-finite count (may raise)."""
        if record.skipped:
            self.consecutive_nonfinite += 1
            self.state.nonfinite_total += 1
            self.log(f"step {record.step}: non-finite loss, step skipped ({self.consecutive_nonfinite} in a row)")
        else:
            self.consecutive_nonfinite = 0
        window.add_step(record, self.tokens_per_step, self.cfg.pixels_per_step(self.world))
        if self.losses_file is not None:
            self.losses_file.write(json.dumps({"step": record.step, "loss": record.loss, "lr": record.lr,
                                               "grad_norm": record.grad_norm, "skipped": record.skipped}) + "\n")
            self.losses_file.flush()
        if self.consecutive_nonfinite >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss "
                                     f"(up to step {record.step}); stopping. Lower optim.lr, raise "
                                     "optim.warmup_steps or check the data.")

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step(self.world)

    def _lr(self) -> float:
        o = self.cfg.optim
        return lr_at(self.state.step, lr=o.lr, warmup_steps=o.warmup_steps, total_steps=self.cfg.train.steps,
                     min_lr=o.min_lr)

    def _boundary(self) -> bool:
        """Whether this step logs, validates, samples or checkpoints (then every record is read)."""
        t, s = self.cfg.train, self.state.step
        return self.checkpointer.due(s) or any(s % every == 0 for every in (t.log_every, t.val_every,
                                                                             t.sample_every))

    @contextmanager
    def _record_files(self) -> Iterator[None]:
        """RUN_DIR/losses.jsonl (rank 0) and, with data.record_keys, this rank's data_keys file, open."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keys = self.run_dir / f"data_keys.rank{self.rank}.jsonl"
        with open(self.run_dir / LOSSES_FILE, "a") if self.rank == 0 else nullcontext() as self.losses_file, \
                open(keys, "a") if self.cfg.data.record_keys else nullcontext() as self.keys_file:
            yield
        self.losses_file = self.keys_file = None

    def run(self) -> int:
        """Train from the current step to ``train.steps``; the exit code (0, or the requeue code on preemption)."""
        m = self.model_cfg
        name = "iGPT" if m.unit == "pixel" else f"patch GPT ({m.patch_size}x{m.patch_size}, {m.order}, {m.target} target)"
        self.log(f"{name} {self.num_params / 1e6:.2f}M params | {self.world} rank(s) on {self.device} | "
                 f"ZeRO-{self.zero_stage} | {self.precision} | {self.tokens_per_step} tokens/step | "
                 f"steps {self.state.step}→{self.cfg.train.steps}")
        status = "FAILED"
        try:
            with self._record_files():
                self._loop()
            metrics, line = self.wall.summary()
            self.tracker.log_metrics(metrics, self.state.step)
            self.log(line)
            status = "FINISHED"
            return 0
        except Preempted:  # raised only once the preemption checkpoint is complete (a failed save raises its error)
            status = "KILLED"
            self.tracker.set_tags({"preempted_at_step": self.state.step})
            self.checkpointer.note_preempted(self.state.step)
            return self.cfg.checkpoint.preempt_exit_code
        finally:
            self.tracker.close(status)
            self.checkpointer.close()

    def _loop(self) -> None:
        """The optimizer steps: each step's record is booked when it comes back from the device (one step late
        on CUDA); at a boundary or on preemption every record is read first (may raise ``Preempted``)."""
        total = self.cfg.train.steps
        self.wall = wall = WallTime()
        batches, records = wall.timed(iter(self.stream), "data"), StepRecords(self.device)
        window = MetricsWindow(self.flops_per_token, self.world, self.peak, total, self.model.cfg.likelihood)
        clock = time.perf_counter()
        while self.state.step < total:
            lr = self._lr()
            with wall.phase("step"):  # with the wait for the step's record (CUDA), less loading the batches
                records.push(self.state.step + 1, lr, self.train_step(batches, lr))
                self.state.step += 1
                due = records.pop()
                preempt = any(r.preempt for r in due) and self.state.step < total
                boundary = self._boundary()
                if boundary or preempt:
                    due += records.pop(flush=True)
            with wall.phase("logging"):
                for record in due:
                    self._account(record, window)
            if boundary or preempt:
                window.add_seconds(time.perf_counter() - clock)
                self._at_boundary(due[-1], window, preempt)
                clock = time.perf_counter()

    def _at_boundary(self, record: StepRecord, window: MetricsWindow, preempt: bool) -> None:
        """Log, validate, sample and checkpoint as this step's number asks (every record is read); on
        preemption checkpoint (once) and raise ``Preempted``."""
        t, step, wall = self.cfg.train, self.state.step, self.wall
        if step % t.log_every == 0 or step == t.steps:
            with wall.phase("logging"):
                metrics, line = window.close(record, tokens_seen=self.state.tokens_seen,
                                             nonfinite_total=self.state.nonfinite_total,
                                             memory_gb=memory_gb(self.device))
                self.tracker.log_metrics(metrics, step)
                self.log(line)
        if step % t.val_every == 0 or step == t.steps:
            with wall.phase("validation"):
                self.validator.validate(step)
        if step % t.sample_every == 0:
            with wall.phase("samples"):
                self.validator.sample_grids(step)
        if preempt:
            self.log(f"step {step}: preemption ({self.checkpointer.signal_name()}) – saving a checkpoint")
        if self.checkpointer.due(step) or preempt:
            with wall.phase("checkpoint"):
                self.save_checkpoint()
        if preempt:
            raise Preempted()


def train(cfg: TrainConfig, resume: str | None = None, trust_checkpoint: bool = False) -> int:
    """Train with the resolved config ``cfg``; the exit code (0, or the preemption requeue code)."""
    keep_freed_heap()  # before the loader's workers fork: they inherit it
    trainer = Trainer(cfg, resume, trust_checkpoint)
    try:
        code = trainer.run()
    except STOPPED_ON_EVERY_RANK:
        _close(trainer)  # every rank raised it at the same step, so every rank reaches the shutdown barrier
        raise
    finally:
        sys.stdout.flush()
    # Not after other errors: the peers may never reach the shutdown barrier.
    _close(trainer)
    return code


def _close(trainer: Trainer) -> None:
    """Free the engine, then leave the process group with rank 0 last (a peer left behind aborts at exit)."""
    trainer.engine.destroy()  # removes ZeRO hooks and frees buffers before the group goes
    shutdown()
