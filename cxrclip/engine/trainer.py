"""The CXR-CLIP trainer: one process (CPU/GPU) or many via torchrun, exact resume, atomic checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from cxrclip.data.batch import Batch
from cxrclip.data.collate import ImageTextCollator, union_label_names
from cxrclip.data.dataset import ImageTextDataset
from cxrclip.data.records import load_imagetext_records, stratified_subset, summarize
from cxrclip.data.transforms import build_transform
from cxrclip.engine.dist import DistEnv, init_distributed, shutdown
from cxrclip.engine.optim import build_optimizer, build_scheduler
from cxrclip.exceptions import ConfigError, OutputError
from cxrclip.io import remove_stale_temp_files
from cxrclip.loss import build_loss
from cxrclip.model.checkpoint import (
    load_checkpoint,
    require_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cxrclip.model.clip import build_model
from cxrclip.model.encoders import build_tokenizer
from cxrclip.spec import LoaderSpec, RunSpec

log = logging.getLogger(__name__)
CHECKPOINT_NAMES = ("model-last.tar", "model-best.tar")


class EpochSampler(Sampler[int]):
    """This rank's indices for one epoch: a permutation fixed by (seed, epoch), split across ranks
    (padded so every rank has the same count), optionally starting ``skip`` indices in (resume)."""

    def __init__(self, size: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(size / world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        order += order[: self.per_rank * self.world - self.size]
        return iter(order[self.rank :: self.world][self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


@dataclass(frozen=True)
class RunSettings:
    """``base`` section, typed. Derived values (per-rank batch, steps) live elsewhere, never in the config."""

    seed: int
    amp: bool
    amp_dtype: str
    resume: str | None
    grad_accum_steps: int
    grad_clip_norm: float | None
    max_decode_failure_frac: float
    checkpoint_dir: Path
    tensorboard_dir: Path
    overwrite: bool = False
    log_every: int = 10
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_cfg(cls, base: Mapping) -> RunSettings:
        if base.get("amp_dtype", "fp16") not in ("fp16", "bf16"):
            raise ConfigError("base.amp_dtype must be fp16 or bf16")
        return cls(
            seed=int(base.get("seed", 1234)),
            amp=bool(base.get("amp", False)),
            amp_dtype=base.get("amp_dtype", "fp16"),
            resume=base.get("resume"),
            grad_accum_steps=int(base.get("grad_accum_steps", 1)),
            grad_clip_norm=base.get("grad_clip_norm"),
            max_decode_failure_frac=float(base.get("max_decode_failure_frac", 0.01)),
            checkpoint_dir=Path(base["output"]["checkpoint"]),
            tensorboard_dir=Path(base["output"]["tensorboard"]),
            overwrite=bool(base.get("overwrite", False)),
            log_every=max(1, int(base.get("log_every", 10))),
            channels_last=bool(base.get("channels_last", False)),
            compile=bool(base.get("compile", False)),
        )

    def check_run_folder(self) -> None:
        """A run never writes over another run's checkpoints unless told to (``base.resume`` / ``base.overwrite``)."""
        if self.resume or self.overwrite:
            return
        found = [name for name in CHECKPOINT_NAMES if (self.checkpoint_dir / name).exists()]
        if found:
            raise OutputError(
                f"{self.checkpoint_dir} already holds {' and '.join(found)} of another run; continue it with "
                f"base.resume={self.checkpoint_dir / 'model-last.tar'}, pick another hydra.run.dir, "
                "or replace it with base.overwrite=true"
            )


def autocast_settings(run: RunSettings, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(enabled, dtype, needs a grad scaler). CPU autocast only in bf16 (fp16 on CPU is slow)."""
    if not run.amp:
        return False, torch.float32, False
    if device.type == "cuda":
        dtype = torch.bfloat16 if run.amp_dtype == "bf16" else torch.float16
        return True, dtype, dtype == torch.float16
    if run.amp_dtype == "bf16":
        return True, torch.bfloat16, False
    log.info("base.amp with fp16 is CUDA-only; training in fp32 on CPU (use base.amp_dtype=bf16 for CPU AMP)")
    return False, torch.float32, False


def load_split(spec: RunSpec, group: str, train: bool, run: RunSettings, env: DistEnv) -> ConcatDataset:
    """Validate every CSV of a data group (all problems at once) and build its dataset."""
    transform = build_transform(spec.transform_steps("train" if train else "valid"), spec.normalize)
    datasets = []
    for dc in spec.data.get(group, ()):
        records = load_imagetext_records(dc)
        if train:
            records = stratified_subset(records, dc.data_frac, run.seed)
        if env.is_main:
            s = summarize(dc, records)
            log.info("%s %s: %d rows, %d images (%s)", group, dc.name, s["rows"], s["images"], s["csv"])
        datasets.append(
            ImageTextDataset(
                records, dc, dc.prompts(), transform, train=train, max_decode_failure_frac=run.max_decode_failure_frac
            )
        )
    if not datasets:
        raise ConfigError(f"no {group} dataset configured")
    return ConcatDataset(datasets)


def make_loader(dataset, loader: LoaderSpec, collate, env: DistEnv, seed: int) -> DataLoader:
    if loader.batch_size % env.world_size:
        raise ConfigError(f"batch_size {loader.batch_size} is not divisible by the {env.world_size} processes")
    sampler = EpochSampler(len(dataset), shuffle=loader.shuffle, seed=seed, rank=env.rank, world=env.world_size)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size // env.world_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=collate,
        drop_last=loader.drop_last,
        pin_memory=loader.pin_memory and env.device.type == "cuda",
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=False,
    )


def speed_up_image_encoder(model: torch.nn.Module, run: RunSettings) -> None:
    """``base.channels_last``: the image encoder's weights (and its inputs) in NHWC, the layout oneDNN and cuDNN
    convolutions prefer. ``base.compile``: the image encoder compiled by TorchInductor in place (its state-dict keys
    stay the same; the first steps pay the compile time)."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        return
    if run.channels_last:
        encoder.to(memory_format=torch.channels_last)
    if run.compile:
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


@dataclass
class Task:
    """What differs between pre-training and probing: the data, how to build the model, the loss,
    and what the checkpoint must carry besides the config."""

    train_set: Dataset
    valid_set: Dataset | None
    collate: Callable
    build_model: Callable[[], torch.nn.Module]
    loss_fn: torch.nn.Module
    checkpoint_extra: Callable[[], dict] = dict
    keep_partial_batch: bool = False  # a linear probe has no in-batch negatives: its last, smaller batch is kept


def run_label_names(spec: RunSpec, env: DistEnv) -> tuple[str, ...]:
    """The union of the run's datasets' label lists: every batch's labels are aligned onto it by name."""
    configs = [dc for group in ("data_train", "data_valid") for dc in spec.data.get(group, ())]
    lists = [dc.label_names for dc in configs]
    names = union_label_names(lists)
    if len(set(lists)) > 1 and env.is_main:
        log.warning(
            "the datasets have different label lists (%s): labels are aligned by name over their union of %d; a "
            "label a dataset does not have is unknown for its rows (label-aware targets compare positives)",
            "; ".join(f"{dc.name}: {len(dc.label_names)}" for dc in configs),
            len(names),
        )
    return names


def clip_task(spec: RunSpec, run: RunSettings, env: DistEnv) -> Task:
    """CXR-CLIP pre-training on image–text data."""
    train_set = load_split(spec, "data_train", True, run, env)
    valid_set = load_split(spec, "data_valid", False, run, env) if spec.data.get("data_valid") else None
    collate = ImageTextCollator(
        build_tokenizer(spec.tokenizer), spec.text_max_length, label_names=run_label_names(spec, env)
    )
    return Task(train_set, valid_set, collate, lambda: build_model(spec.model), build_loss(spec.loss))


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
        speed_up_image_encoder(self.model, self.run)
        self.loss_fn = self.task.loss_fn
        self.optimizer = build_optimizer(self.model, self.spec.optimizer)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.run.grad_accum_steps)
        self.scheduler = build_scheduler(self.optimizer, self.spec.schedule, self.steps_per_epoch)
        self.autocast, self.amp_dtype, use_scaler = autocast_settings(self.run, env.device)
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
                "device %s, %d process(es), per-process batch %d, %d steps/epoch, %d epochs, autocast %s",
                env.device,
                env.world_size,
                self.train_loader.batch_size,
                self.steps_per_epoch,
                self.total_epochs,
                self.amp_dtype if self.autocast else "off",
            )

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self, train_loss: float, val_loss: float | None) -> dict:
        return {
            "model": self.model.state_dict(),
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
        self.model.load_state_dict(ckpt["model"], strict=True)
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
            batch = batch.to(self.env.device, self.run.channels_last)
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
        self.model.eval()
        total = torch.zeros(2, device=self.env.device)
        for batch in self.valid_loader:
            with torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.autocast):
                batch = batch.to(self.env.device)
                out = self.model(batch)
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
