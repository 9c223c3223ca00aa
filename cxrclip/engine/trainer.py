"""The CXR-CLIP trainer: one process (CPU/GPU) or many via torchrun, exact resume, atomic checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping

import torch
from omegaconf import DictConfig

from cxrclip.data.batch import Batch
from cxrclip.engine.dist import DistEnv, init_distributed, shutdown
from cxrclip.engine.loader import make_loader
from cxrclip.engine.optim import build_optimizer, build_scheduler
from cxrclip.engine.settings import CHECKPOINT_NAMES, RunSettings, autocast_settings
from cxrclip.engine.tasks import Task, clip_task
from cxrclip.exceptions import ConfigError
from cxrclip.io import remove_stale_temp_files
from cxrclip.model.checkpoint import (
    load_checkpoint,
    require_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cxrclip.model.speed import use_channels_last
from cxrclip.spec import RunSpec

log = logging.getLogger(__name__)


def channels_last_image_encoder(model: torch.nn.Module, run: RunSettings, device: torch.device, autocast: bool) -> bool:
    """``base.channels_last`` (auto: on for a convolutional image encoder, ``cxrclip.model.speed``): the image
    encoder's weights, and the image batches, in NHWC, the layout oneDNN and cuDNN convolutions prefer. Returns
    whether it is on."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        return False
    on = use_channels_last(run.channels_last, encoder, device, autocast)
    if hasattr(model, "set_channels_last"):
        model.set_channels_last(on)
    elif on:
        encoder.to(memory_format=torch.channels_last)
    return on


def compile_image_encoder(model: torch.nn.Module, run: RunSettings) -> None:
    """``base.compile``: the image encoder compiled by TorchInductor in place (its state-dict keys stay the same;
    the first steps pay the compile time)."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is not None and run.compile:
        encoder.compile()


class StopRequest:
    """SIGTERM/SIGINT set a flag; the trainer finishes the step, saves ``model-last.tar`` and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %d: finishing this step, saving model-last.tar, then stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, env: DistEnv) -> bool:
        if not env.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=env.device)
        return bool(env.all_mean(flag).item() > 0)


def make_ema(model: torch.nn.Module, run: RunSettings):
    """``base.ema_decay``: timm's ``ModelEmaV3`` (weights and float buffers), updated after every optimizer step;
    its first update copies the weights, and with ``base.ema_warmup`` the decay rises as 1 − (1 + step)^(−2/3)
    up to ``ema_decay``."""
    if run.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=run.ema_decay, use_warmup=run.ema_warmup)


class Trainer:
    """Holds what a run needs; ``fit()`` runs the epochs. Built by ``train(cfg)``."""

    def __init__(self, spec: RunSpec | DictConfig, env: DistEnv, make_task: Callable[..., Task] = clip_task):
        self.spec = spec if isinstance(spec, RunSpec) else RunSpec.from_config(spec)
        self.env = env
        self.run = RunSettings.from_cfg(self.spec.base)
        self.total_epochs = self.spec.schedule.total_epochs
        self.run.check_run_folder()
        if env.is_main:  # temp files of saves interrupted by a kill -9 (the checkpoints themselves are whole)
            for name in CHECKPOINT_NAMES:
                remove_stale_temp_files(self.run.checkpoint_dir / name)
        torch.manual_seed(self.run.seed + env.rank)
        # data first (inside the task): a bad CSV stops the run before any model is built
        self.task = make_task(self.spec, self.run, env)
        self.train_set, self.valid_set = self.task.train_set, self.task.valid_set
        loaders = {split: self.spec.loader(split) for split in ("train", "valid")}
        if self.task.keep_partial_batch:
            loaders["train"] = dataclasses.replace(loaders["train"], drop_last=False)
        self.train_loader = make_loader(self.train_set, loaders["train"], self.task.collate, env, self.run.seed)
        self.valid_loader = (
            make_loader(self.valid_set, loaders["valid"], self.task.collate, env, self.run.seed)
            if self.valid_set is not None
            else None
        )
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"{len(self.train_set)} training rows give no full batch of "
                f"{loaders['train'].batch_size}; lower dataloader.train.batch_size"
            )
        self.model = self.task.build_model().to(env.device)
        self.autocast, self.amp_dtype, use_scaler = autocast_settings(self.run, env.device)
        self.channels_last = channels_last_image_encoder(self.model, self.run, env.device, self.autocast)
        self.ema = make_ema(self.model, self.run)  # a copy in the same memory format
        compile_image_encoder(self.model, self.run)
        self.loss_fn = self.task.loss_fn
        self.optimizer = build_optimizer(self.model, self.spec.optimizer)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.run.grad_accum_steps)
        self.scheduler = build_scheduler(self.optimizer, self.spec.schedule, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)
        self.ddp = (
            torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
            )
            if env.distributed
            else self.model
        )
        self.epoch, self.batches_done, self.step, self.best_val = 0, 0, 0, math.inf
        self.writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run.tensorboard_dir))
            log.info(
                "device %s, %d process(es), per-process batch %d, %d steps/epoch, %d epochs, autocast %s, "
                "image encoder %s",
                env.device,
                env.world_size,
                self.train_loader.batch_size,
                self.steps_per_epoch,
                self.total_epochs,
                self.amp_dtype if self.autocast else "off",
                "NHWC (channels_last)" if self.channels_last else "NCHW",
            )

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """The weights that are validated, saved as ``model`` and so evaluated later: the EMA when it is on."""
        return self.model if self.ema is None else self.ema.module

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self, train_loss: float, val_loss: float | None) -> dict:
        ema = {} if self.ema is None else {"train_model": self.model.state_dict(), "ema_decay": self.run.ema_decay}
        return {
            "model": self.evaluated_model.state_dict(),
            **ema,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.spec.plain,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
            "rng": rng_state(),
            "world_size": self.env.world_size,
            **self.task.checkpoint_extra(),
        }

    def save(self, name: str, train_loss: float, val_loss: float | None) -> None:
        if self.env.is_main:
            path = save_checkpoint(self.run.checkpoint_dir / name, self.state(train_loss, val_loss))
            log.info("saved %s", path)
        self.env.barrier()

    def resume(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        require_training_state(ckpt, path)
        self.model.load_state_dict(ckpt.get("train_model", ckpt["model"]), strict=True)
        if self.ema is not None:
            if "train_model" not in ckpt:
                log.warning("%s was saved without an EMA: the EMA starts from its weights", path)
            self.ema.module.load_state_dict(ckpt["model"], strict=True)
        elif "train_model" in ckpt:
            log.warning("%s was trained with base.ema_decay; resuming without it continues from its raw weights", path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batches_done, self.step = ckpt["epoch"], ckpt["batches_done"], ckpt["step"]
        self.best_val = ckpt["best_val_loss"]
        if ckpt.get("world_size", 1) == self.env.world_size:
            set_rng_state(ckpt["rng"])
        else:
            log.warning("resuming with a different number of processes: random streams are not restored exactly")
        log.info("resumed from %s at epoch %d (+%d batches), step %d", path, self.epoch, self.batches_done, self.step)

    # -- loops -------------------------------------------------------------------------------------
    def forward_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.autocast):
            batch = batch.to(self.env.device, self.channels_last)
            out = self.ddp(batch)
        return self.loss_fn(out, batch)

    def optimizer_step(self) -> None:
        if self.run.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.run.grad_clip_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def log_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        if self.writer is None:
            return
        for name, value in losses.items():
            self.writer.add_scalar(f"train/{name}", float(value.detach()), self.step)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
        if hasattr(self.model, "scale"):
            self.writer.add_scalar("train/temperature", 1.0 / float(self.model.scale.detach()), self.step)

    def train_epoch(self, stop: StopRequest) -> tuple[float, bool]:
        """One epoch (or its rest, after a mid-epoch resume); returns (mean loss, stopped early).

        The loop does not wait for the device on every step: the loss sum and the finite check stay on the
        device and are read every ``base.log_every`` steps (and at the end), and with several processes the
        stop flag is agreed on at the same points."""
        from tqdm import tqdm

        self.model.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        epoch_batches = len(self.train_loader)  # the whole epoch's, before a resume skips the batches already done
        self.train_loader.sampler.set_epoch(self.epoch, skip=self.batches_done * self.train_loader.batch_size)
        accum, count = self.run.grad_accum_steps, 0
        total = torch.zeros((), device=self.env.device)
        finite = torch.ones((), dtype=torch.bool, device=self.env.device)
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {self.epoch + 1}/{self.total_epochs}",
            disable=not self.env.is_main,
            dynamic_ncols=True,
            leave=False,
        )
        for batch in bar:
            last_micro = (self.batches_done + 1) % accum == 0 or self.batches_done + 1 == epoch_batches
            sync = contextlib.nullcontext() if last_micro or not self.env.distributed else self.ddp.no_sync()
            with sync:
                losses = self.forward_loss(batch)
                finite &= torch.isfinite(losses["loss"].detach())
                self.scaler.scale(losses["loss"] / accum).backward()
            self.batches_done += 1
            if last_micro:
                self.optimizer_step()
            total += losses["loss"].detach().float()
            count += 1
            report = count % self.run.log_every == 0 or self.batches_done == epoch_batches
            if report:
                self.check_finite(finite)
                if last_micro:
                    self.log_step(losses)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{float(total) / count:.4f}", lr=f"{lr:.2e}")
            # one process: the flag is a plain bool, read every step; several: agreed (an all-reduce) when reporting
            if (report or not self.env.distributed) and stop.agreed(self.env):
                self.check_finite(finite)
                return float(total) / max(count, 1), True
        self.check_finite(finite)
        return float(total) / max(count, 1), False

    def check_finite(self, finite: torch.Tensor) -> None:
        if not bool(finite):
            raise FloatingPointError(
                f"non-finite loss at epoch {self.epoch + 1} (by step {self.step}); stopping. The last good "
                f"checkpoints in {self.run.checkpoint_dir} are kept. "
                "Try a lower learning rate, base.grad_clip_norm=1.0, or base.amp=false."
            )

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss (deterministic prompts and views), averaged over processes."""
        if self.valid_loader is None:
            return None
        model = self.evaluated_model.eval()
        total = torch.zeros(2, device=self.env.device)
        for batch in self.valid_loader:
            with torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.autocast):
                batch = batch.to(self.env.device)
                out = model(batch)
            total += torch.stack([self.loss_fn(out, batch)["loss"].float(), torch.ones((), device=self.env.device)])
        total = self.env.all_mean(total)
        return float(total[0] / total[1])

    def fit(self) -> dict:
        train_loss, val_loss = math.nan, None
        with StopRequest() as stop:
            while self.epoch < self.total_epochs:
                start = time.perf_counter()
                train_loss, stopped = self.train_epoch(stop)
                if stopped:
                    self.save("model-last.tar", train_loss, None)
                    log.warning(
                        "stopped on request during epoch %d; resume with base.resume=%s",
                        self.epoch + 1,
                        self.run.checkpoint_dir / "model-last.tar",
                    )
                    return {"stopped": True, "epoch": self.epoch, "step": self.step}
                self.epoch, self.batches_done = self.epoch + 1, 0
                val_loss = self.validate()
                self.log_epoch(train_loss, val_loss, time.perf_counter() - start)
                if val_loss is not None and val_loss < self.best_val:
                    self.best_val = val_loss
                    self.save("model-best.tar", train_loss, val_loss)
                self.save("model-last.tar", train_loss, val_loss)
        if self.valid_loader is None:
            self.save("model-best.tar", train_loss, None)
        return {
            "stopped": False,
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
        }

    def log_epoch(self, train_loss: float, val_loss: float | None, seconds: float) -> None:
        if not self.env.is_main:
            return
        rows = len(self.train_loader) * self.train_loader.batch_size * self.env.world_size
        log.info(
            "epoch %d/%d: train loss %.4f, valid loss %s, %.1f s (%.1f samples/s)",
            self.epoch,
            self.total_epochs,
            train_loss,
            "-" if val_loss is None else f"{val_loss:.4f}",
            seconds,
            rows / max(seconds, 1e-9),
        )
        if val_loss is not None:
            self.writer.add_scalar("valid/loss", val_loss, self.epoch)
        self.writer.flush()


def train(cfg: DictConfig | RunSpec, make_task: Callable[..., Task] = clip_task) -> dict:
    """Run a training job from a composed config (read once into a :class:`RunSpec`); returns the final metrics."""
    spec = cfg if isinstance(cfg, RunSpec) else RunSpec.from_config(cfg)
    env = init_distributed()
    try:
        trainer = Trainer(spec, env, make_task)
        if trainer.run.resume:
            trainer.resume(str(trainer.run.resume))
        result = trainer.fit()
        if trainer.writer is not None:
            trainer.writer.close()
        return result
    finally:
        shutdown(env)
