"""The loop every stage shares (Trainer): AdamW (Loshchilov & Hutter 2019), a learning rate that warms up linearly
then decays along a half cosine (Loshchilov & Hutter 2017, SGDR), gradient-norm clipping, optional bf16 autocast on
the CPU, and an exponential moving average of the weights (Polyak averaging; the EMA weights are what is sampled and
saved). Each stage keeps its state in OUT/train/STAGE.pt, so an interrupted run resumes where it stopped; a batch
depends only on the seed and the step number, so a resumed run takes the same steps as an uninterrupted one.

Data-parallel (under torchrun, torch.distributed initialised by cli.py): each of the N processes computes the loss on
its N-th of the global batch (every process draws the whole batch from the same generator and keeps its share), the
model wrapped in DistributedDataParallel, which averages the gradients across processes; so every process takes the
step a single process would take on the whole batch, to float rounding. Process 0 alone writes the state, the logs
and the sample grids; the state holds nothing per-process, so any number of processes resumes it.
"""
import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from .. import runtime
from ..errors import UserError
from ..progress import Progress
from .objectives import Loss

SampleGrid = Callable[[torch.nn.Module], Image.Image]  # EMA model -> one image showing what it makes now


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # maximum global gradient norm
    ema_decay: float = 0.999
    bf16: bool = False  # autocast the forward pass to bfloat16 (faster on CPUs with AVX-512 BF16 or AMX)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500  # steps between sample grids (0: none)
    save_every: int = 500  # steps between training checkpoints


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier: 0 -> 1 linearly over `warmup` steps, then 1 -> 0 along a half cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every step. d starts low and rises to `decay` as
    (1 + step) / (10 + step), so that the average forgets the random initialisation quickly (diffusers' EMAModel)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:  # frozen parameters stay equal
                ema.lerp_(p.detach(), 1 - d)


class Objective(torch.nn.Module):
    """The model and its loss as one module, whose forward is the loss: what DistributedDataParallel wraps (it
    averages the gradients of the parameters used in forward)."""

    def __init__(self, model: torch.nn.Module, loss: Loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, generator: torch.Generator, share: slice) -> torch.Tensor:
        return self.loss(self.model, generator, share)


def process_group() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Trainer:
    """The loop every stage shares. `loss(model, generator)` draws its batch from the generator it is given, which
    is seeded with (seed, step): so the run is the same whether or not it was stopped and resumed."""

    def __init__(self, name: str, model: torch.nn.Module, loss: Loss, config: TrainConfig, out: Path,
                 sample_grid: SampleGrid | None = None):
        self.name, self.model, self.loss, self.config, self.out = name, model, loss, config, out
        self.sample_grid = sample_grid
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, config.warmup_steps, config.steps))
        self.ema = EMA(model, config.ema_decay)
        self.step = 0
        self.rank, processes = process_group()
        if config.batch_size % processes:
            raise UserError(f"--batch-size {config.batch_size} is the global batch: it must be a multiple of the "
                            f"{processes} processes")
        part = config.batch_size // processes
        self.share = slice(self.rank * part, (self.rank + 1) * part)
        self.objective = Objective(model, loss)
        if processes > 1:
            self.objective = DistributedDataParallel(self.objective)
        device = next(model.parameters()).device
        if config.bf16 and (slow := runtime.slow_precision(torch.bfloat16, device)) is not None:
            warnings.warn(slow, RuntimeWarning, stacklevel=2)

    @property
    def state_path(self) -> Path:
        return self.out / "train" / f"{self.name}.pt"

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}

    def save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), self.state_path.with_suffix(".part"))
        self.state_path.with_suffix(".part").replace(self.state_path)  # a crash mid-write leaves the last one intact

    def resume(self) -> bool:
        """Load OUT/train/NAME.pt if it exists; True if it did."""
        if not self.state_path.exists():
            return False
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.ema.model.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            if type(state["step"]) is not int or state["step"] < 0:
                raise ValueError(f"step {state['step']!r}")
            self.step = state["step"]
        except Exception as e:  # truncated, another stage's or model's, not a torch file: unpickling raises anything
            raise UserError(f"{self.state_path} is not a resumable state of this run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}): delete it to start over") from None
        return True

    def train_step(self) -> float:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = self.objective(generator, self.share)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()   # DistributedDataParallel: the gradients are averaged over the processes here
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        loss = loss.detach().float()
        if dist.is_initialized():   # the global batch's loss: the mean of the processes' equal shares
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return loss.item()

    def run(self, until: int | None = None) -> torch.nn.Module:
        """Train from the current step to `until` (default: config.steps), logging to stdout and OUT/NAME-loss.csv,
        saving sample grids to OUT/samples/ and the state to OUT/train/ (process 0 alone); returns the EMA model."""
        cfg, until = self.config, until or self.config.steps
        writes = self.rank == 0
        log = self.out / f"{self.name}-loss.csv"
        if writes and not log.exists():
            log.write_text("step,loss,lr\n")
        progress, losses = Progress(self.name, start=self.step, quiet=not writes), []
        while self.step < until:
            losses.append(self.train_step())
            if not writes:
                continue
            if self.step % cfg.log_every == 0 or self.step == until:
                lr = self.lr_schedule.get_last_lr()[0]
                with log.open("a") as f:
                    f.write(f"{self.step},{np.mean(losses):.5f},{lr:.3g}\n")
                progress(self.step, until, f"loss {np.mean(losses):.4f}  lr {lr:.2g}")
                losses = []
            if self.step % cfg.save_every == 0 or self.step == until:
                self.save()
            if self.sample_grid and cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == until):
                (self.out / "samples").mkdir(exist_ok=True)
                self.sample_grid(self.ema.model).save(self.out / "samples" / f"{self.name}-{self.step:06d}.png")
        return self.ema.model
