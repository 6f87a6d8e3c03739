"""Data-parallel training (loop.py under torch.distributed, gloo on the CPU, 2 processes): the weights after k steps
are those of one process on the same global batch, and a 2-process run stopped and resumed (by 2 processes or by 1)
is the uninterrupted run."""
import gc
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdlite import UserError
from sdlite.train import loop

STEPS, LR = 10, 1e-2


def toy_trainer(out: Path) -> loop.Trainer:
    """A small MLP regression, a global batch of 8 drawn from the step's generator, `share` of it this process's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))

    def loss(m, g, share):
        x = data[torch.randint(64, (8,), generator=g)][share]
        return (m(x).squeeze(1) - x.sum(1).sin()).pow(2).mean()
    config = loop.TrainConfig(steps=STEPS, batch_size=8, lr=LR, warmup_steps=2, ema_decay=0.9, log_every=10**6,
                              sample_every=0, save_every=2)
    return loop.Trainer("toy", model, loss, config, out)


def worker(rank: int, port: int, runs: list[tuple[str, int, bool]]) -> None:
    """Each run: (folder, step to stop at, whether to take one more step that no save keeps, as a killed run)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for folder, until, killed in runs:
            trainer = toy_trainer(Path(folder))
            trainer.resume()
            trainer.run(until)
            if killed:   # a step that no save keeps; the state it stopped at kept aside for a 1-process resumption
                trainer.train_step()
                if rank == 0:
                    trainer.state_path.with_name("stopped.pt").write_bytes(trainer.state_path.read_bytes())
        del trainer   # its DistributedDataParallel freed while the process group lives (freed later, at exit, it
        gc.collect()  # aborts the process: 'terminate called without an active exception', 1 run in ~15)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def two_processes(runs: list[tuple[Path, int, bool]]) -> None:
    with socket.socket() as s:   # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, [(str(folder), until, killed) for folder, until, killed in runs]), nprocs=2)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "train" / "toy.pt", weights_only=True)["model"]


def test_two_processes_train_as_one_and_resume(tmp_path):
    for name in ("one", "two", "killed", "resumed-by-one"):
        (tmp_path / name).mkdir()
    one = toy_trainer(tmp_path / "one")
    one.run()
    # in one spawn: the 2-process run; a 2-process run killed during step 5 (its last save: step 4); its resumption
    two_processes([(tmp_path / "two", STEPS, False), (tmp_path / "killed", 4, True),
                   (tmp_path / "killed", STEPS, False)])
    alone = toy_trainer(tmp_path / "resumed-by-one")    # the killed run's step-4 state resumed by 1 process
    alone.state_path.parent.mkdir()
    alone.state_path.write_bytes((tmp_path / "killed" / "train" / "stopped.pt").read_bytes())
    assert alone.resume() and alone.step == 4
    alone.run()

    two = weights(tmp_path / "two")
    # The same steps to float rounding: the gradient is a mean of 8 per-item gradients, summed by one process at once
    # or in two halves and averaged (a few float32 roundings apart, ~1e-7 relative); Adam turns a relative error of
    # the gradient into about the same relative error of its step, at most ~LR per weight per step, and the 10
    # steps add theirs: 10 * LR * 1e-4 allows 1000x the rounding (cancellation in the sums), while a batch drawn
    # wrongly (not the same items, a half not averaged) moves the weights by ~LR.
    tolerance = STEPS * LR * 1e-4
    for key, value in weights(tmp_path / "one").items():
        assert (value - two[key]).abs().max() <= tolerance, key
    for key, value in weights(tmp_path / "killed").items():   # the same processes, the same steps: the same bits
        assert torch.equal(value, two[key]), key
    for key, value in alone.model.state_dict().items():
        assert (value - two[key]).abs().max() <= tolerance, key


def test_the_global_batch_must_split_evenly(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "process_group", lambda: (0, 3))   # as in the third of 3 processes
    with pytest.raises(UserError, match="multiple of the 3 processes"):
        toy_trainer(tmp_path)
