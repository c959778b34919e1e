"""``make bench``: augmentation throughput, framework overhead against a plain PyTorch loop, peak memory.

The training comparison feeds the same pre-made batches to (1) a method trained by the Lightning
Trainer with everything the framework adds per step (logging, pseudo-label diagnostics, the NaN
guard, the EMA callback path, the schedule) and (2) a hand-written loop doing the same forward,
loss, backward, SGD step, schedule step and EMA update. Runs alternate so drift in machine load hits
both alike; each reports the median step time of its timed steps.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger

from ssl_lightning.components.ema import EMAWeights
from ssl_lightning.data.module import StreamBatch
from ssl_lightning.data.views import ViewConfig, view_throughput
from ssl_lightning.methods import FixMatch, InfoMatch, SimMatch
from ssl_lightning.methods.base import cosine_factor, parameter_groups
from ssl_lightning.nets import build_backbone


class _StepTimes(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def _batches(batch_size: int, mu: int, device: torch.device, seed: int = 0,
             unlabeled_views: int = 2) -> list[dict[str, StreamBatch]]:
    generator = torch.Generator().manual_seed(seed)

    def stream(n: int, views: int) -> StreamBatch:
        images = [torch.randn(n, 3, 32, 32, generator=generator).to(device) for _ in range(views)]
        return StreamBatch(images, torch.randint(0, 10, (n,), generator=generator).to(device), torch.arange(n))

    return [{"labeled": stream(batch_size, 1), "unlabeled": stream(batch_size * mu, unlabeled_views)}
            for _ in range(4)]


class _Cycle:
    """An endless iterable over a few batches (Lightning accepts any iterable as a train loader)."""

    def __init__(self, batches: list[dict[str, StreamBatch]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, StreamBatch]]:
        k = 0
        while True:
            yield self.batches[k % len(self.batches)]
            k += 1


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def framework_step_times(method: Callable[[], LightningModule], batches: list, steps: int, warmup: int,
                         device: torch.device, precision: str) -> list[float]:
    timer = _StepTimes()
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = Trainer(
            max_steps=steps + warmup, accelerator=device.type, devices=1, precision=precision,
            logger=CSVLogger(log_dir), enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[timer], limit_val_batches=0, num_sanity_val_steps=0,
            max_epochs=-1, log_every_n_steps=50,
        )
        trainer.fit(method(), train_dataloaders=_Cycle(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    starts = [*timer.starts, time.perf_counter()]
    return [b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1:], strict=True)]


def plain_fixmatch_step_times(batches: list, steps: int, warmup: int, device: torch.device,
                              precision: str, lambda_u: float = 1.0, threshold: float = 0.95) -> list[float]:
    """FixMatch written as a bare loop: the reference the framework's overhead is measured against."""
    model = build_backbone("wrn28_2", num_classes=10).to(device)
    ema = EMAWeights(model, 0.999).to(device)
    optimizer = torch.optim.SGD(
        parameter_groups(model, 5e-4), lr=0.03, momentum=0.9, nesterov=True, foreach=True
    )
    total = steps + warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: cosine_factor(k, total))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    times = []
    model.train()
    for k in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = batches[k % len(batches)]
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        with autocast:
            logits = model(torch.cat([labeled.views[0], *unlabeled.views]))
        logits_l, logits_weak, logits_strong = logits.float().split(
            [labeled.views[0].shape[0], unlabeled.views[0].shape[0], unlabeled.views[1].shape[0]]
        )
        confidence, pseudo_labels = logits_weak.detach().softmax(dim=1).max(dim=1)
        mask = (confidence >= threshold).float()
        loss = F.cross_entropy(logits_l, labeled.targets) + lambda_u * (
            F.cross_entropy(logits_strong, pseudo_labels, reduction="none") * mask
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(model)
        if k >= warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def _infomatch(batch_size: int) -> LightningModule:
    return InfoMatch(num_classes=10, backbone="wrn28_2")


def _simmatch(batch_size: int) -> LightningModule:
    # Propagation on from the first step; the bank has one slot per labeled example of the batches.
    model = SimMatch(num_classes=10, backbone="wrn28_2", instance_warmup_steps=0)
    model.bank.reset(torch.arange(batch_size), torch.arange(batch_size) % 10, seed=0)
    return model


def run(batch_size: int, mu: int, steps: int, warmup: int, repeats: int) -> list[tuple[str, str, str]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    rows: list[tuple[str, str, str]] = []

    config = ViewConfig(image_size=32, crop_pad=4, hflip=True)
    for name in ("weak", "strong"):
        rows.append((f"view `{name}`, 32×32×3, 1 process", f"{view_throughput(name, config):,.0f} img/s", ""))

    batches = _batches(batch_size, mu, device)
    images_per_step = batch_size * (1 + 2 * mu)
    framework: list[float] = []
    plain: list[float] = []
    peaks = {"framework": 0.0, "plain": 0.0}
    for _ in range(repeats):
        _reset_peak(device)
        plain += plain_fixmatch_step_times(batches, steps, warmup, device, precision)
        peaks["plain"] = max(peaks["plain"], _peak_memory_mb(device))
        _reset_peak(device)
        framework += framework_step_times(
            lambda: FixMatch(num_classes=10, backbone="wrn28_2"), batches, steps, warmup, device, precision
        )
        peaks["framework"] = max(peaks["framework"], _peak_memory_mb(device))
    plain_step, framework_step = statistics.median(plain), statistics.median(framework)
    # The median carries machine noise; the fastest step of each loop shows the work each one does.
    overhead = 100 * (framework_step / plain_step - 1)
    best_overhead = 100 * (min(framework) / min(plain) - 1)
    label = f"WRN-28-2, B={batch_size}, μ={mu}, {device.type}, {precision}"
    rows.append((f"plain PyTorch FixMatch step ({label})", f"{images_per_step / plain_step:,.1f} img/s",
                 f"median {plain_step * 1e3:.1f} ms/step, best {min(plain) * 1e3:.1f}"))
    rows.append((f"ssl_lightning FixMatch step ({label})", f"{images_per_step / framework_step:,.1f} img/s",
                 f"median {framework_step * 1e3:.1f} ms/step, best {min(framework) * 1e3:.1f}; "
                 f"overhead {overhead:+.1f}% (median), {best_overhead:+.1f}% (best)"))
    # Other methods, timed the same way: their own unlabeled views per step, and the unlabeled images
    # each one forwards per unlabeled sample (InfoMatch adds a CutMix of the weak view to its 3 views).
    for name, factory, views, forwarded in (("InfoMatch", _infomatch, 3, 4), ("SimMatch", _simmatch, 2, 2)):
        method_batches = _batches(batch_size, mu, device, unlabeled_views=views)
        times: list[float] = []
        for _ in range(max(1, repeats // 2)):
            times += framework_step_times(partial(factory, batch_size), method_batches, steps, warmup, device,
                                          precision)
        step = statistics.median(times)
        rows.append((f"ssl_lightning {name} step ({label})",
                     f"{batch_size * (1 + forwarded * mu) / step:,.1f} img/s",
                     f"median {step * 1e3:.1f} ms/step; {step / framework_step:.2f}× FixMatch's step"))
    memory_kind = "max CUDA allocated" if device.type == "cuda" else "process peak RSS (cumulative)"
    rows.append((f"peak memory, plain loop ({memory_kind})", f"{peaks['plain']:,.0f} MiB", ""))
    rows.append((f"peak memory, ssl_lightning ({memory_kind})", f"{peaks['framework']:,.0f} MiB", ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="labeled batch B")
    parser.add_argument("--mu", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4, help="alternating runs of each loop")
    parser.add_argument("--solver-n", type=int, default=50_000, help="points N of the pseudo-label solver table")
    parser.add_argument("--skip-solver", action="store_true", help="leave out the solver table")
    args = parser.parse_args()
    rows = run(args.batch_size, args.mu, args.steps, args.warmup, args.repeats)
    print("| benchmark | throughput | detail |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    if not args.skip_solver:
        from ssl_lightning.solvers.benchmark import solver_table

        # The collision paper's Table 1: EM against projected gradient at equal reached objective.
        print(f"\n### Pseudo-label solvers (N = {args.solver_n:,})\n")
        print(solver_table(n=args.solver_n))


if __name__ == "__main__":
    main()
