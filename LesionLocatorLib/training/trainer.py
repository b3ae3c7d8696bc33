"""The training loop: Dice + cross-entropy, AdamW with a poly learning-rate decay, resumable checkpoints.

The work folder holds `checkpoint_latest.pth` (weights, optimizer, step, random state, loss log; written every
`checkpoint_every` steps and on stop) and `training_log.json`. The model root written at the end is the official
format (see plans.write_model_root) and holds no training state.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import load_checkpoint_file, load_checkpoint_folder, resolve_task_folder
from ..errors import LesionLocatorError
from ..prediction import resolve_device
from .plans import NET_FOLDER, TASKS, LiteModelConfig, build_lite_network, write_model_root
from .samples import DEFAULT_PROMPT_MIX, TrainingSample, cached_sample_paths, load_sample, make_batch

LATEST = "checkpoint_latest.pth"


@dataclass
class TrainingOptions:
    steps: int = 3000
    batch_size: int = 2
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    time_limit_s: float | None = None  # stop (resumable) after this much wall time in this run
    prompt_mix: tuple[float, float, float] = DEFAULT_PROMPT_MIX  # point, box, previous mask
    samples_in_memory: int = 400  # cached samples held in RAM at once (a random subset, refreshed)
    size_weighting: float = 0.0  # draw a sample with probability ~ (lesion voxels)^size_weighting; 0: uniform
    patch_size_zyx: tuple[int, int, int] | None = None  # training patch; None: the plans' (inference) patch
    deep_supervision: bool = True  # nnU-Net's multi-scale loss (the saved network has the same weights either way)
    init_weights: str | None = None  # start from these weights (model root, model folder or checkpoint file)
    init_task: str = "point"  # which network of a model root `init_weights` starts from
    own_data_share: float = 0.0  # share of samples drawn from the user's own annotated scans (train's own_cache)


@dataclass
class TrainingState:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per log interval
    seconds: float = 0.0  # training wall time over all runs


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice of the lesion class), Dice per sample then averaged: every prompted lesion
    counts the same, as in the per-lesion evaluation (a batch Dice lets large lesions drown small ones)."""
    cross_entropy = torch.nn.functional.cross_entropy(logits, target)
    probability = torch.softmax(logits, dim=1)[:, 1]
    foreground = (target == 1).float()
    spatial = tuple(range(1, probability.ndim))
    intersection = (probability * foreground).sum(spatial)
    dice = (2 * intersection + 1e-5) / (probability.sum(spatial) + foreground.sum(spatial) + 1e-5)
    return cross_entropy + (1 - dice.mean())


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's weighting: scale i weighs 1/2^i (the coarsest output is ignored, unless it is the only one: a
    two-stage network has a single output), weights normalized to 1; targets are downsampled with nearest neighbours."""
    weights = torch.tensor([1 / 2 ** i for i in range(len(outputs))])
    if len(outputs) > 1:
        weights[-1] = 0
    weights = weights / weights.sum()
    total = outputs[0].new_zeros(())
    for weight, output in zip(weights.tolist(), outputs):
        if weight == 0:
            continue
        scaled = target if output.shape[2:] == target.shape[1:] else torch.nn.functional.interpolate(
            target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
        total = total + weight * dice_ce_loss(output, scaled)
    return total


def poly_learning_rate(step: int, options: TrainingOptions) -> float:
    if step < options.warmup_steps:
        return options.learning_rate * (step + 1) / options.warmup_steps
    return options.learning_rate * (1 - step / options.steps) ** 0.9


class SamplePool:
    """A random subset of the cached samples in memory; one member is replaced every few steps, and the cache
    folder is re-read now and then, so training can start while samples are still being generated.
    `size_weighting` > 0 draws large lesions more often (the log-uniform diameters make them rare)."""

    def __init__(self, cache: Path, size: int, rng: np.random.Generator, max_samples: int | None = None,
                 size_weighting: float = 0.0):
        self.cache = Path(cache)
        self.max_samples = max_samples
        self.rng = rng
        self.size_weighting = size_weighting
        self.rescan()
        if not self.paths:
            raise LesionLocatorError(f"The training sample cache {self.cache} is empty; generate samples first.")
        chosen = rng.choice(len(self.paths), size=min(size, len(self.paths)), replace=False)
        self.samples: list[TrainingSample] = [load_sample(self.paths[i]) for i in chosen]
        self.lesion_voxels = np.array([s.target.sum() for s in self.samples], float)

    def rescan(self) -> None:
        self.paths = cached_sample_paths(self.cache)[: self.max_samples]

    def draw(self, count: int) -> list[TrainingSample]:
        if self.size_weighting == 0:
            return [self.samples[i] for i in self.rng.integers(len(self.samples), size=count)]
        weights = np.maximum(self.lesion_voxels, 1.0) ** self.size_weighting
        return [self.samples[i] for i in self.rng.choice(len(self.samples), size=count, p=weights / weights.sum())]

    def refresh_one(self) -> None:
        if len(self.paths) > len(self.samples):
            slot = int(self.rng.integers(len(self.samples)))
            self.samples[slot] = load_sample(self.paths[int(self.rng.integers(len(self.paths)))])
            self.lesion_voxels[slot] = self.samples[slot].target.sum()


class MixedPool:
    """Draws each sample from one of several pools with fixed probabilities (synthetic samples and own data)."""

    def __init__(self, pools: list[SamplePool], shares: list[float], rng: np.random.Generator):
        self.pools, self.rng = pools, rng
        self.shares = np.asarray(shares, float) / sum(shares)

    def draw(self, count: int) -> list[TrainingSample]:
        return [self.pools[i].draw(1)[0] for i in self.rng.choice(len(self.pools), size=count, p=self.shares)]

    def refresh_one(self) -> None:
        for pool in self.pools:
            pool.refresh_one()

    def rescan(self) -> None:
        for pool in self.pools:
            pool.rescan()


def _sample_pool(cache: Path, own_cache: Path | None, options: TrainingOptions, rng: np.random.Generator,
                 max_samples: int | None) -> SamplePool | MixedPool:
    share = options.own_data_share if own_cache is not None else 0.0
    if not 0.0 <= share <= 1.0:
        raise LesionLocatorError(f"The own-data share must be between 0 and 1; got {share}.")
    if share == 0.0:
        return SamplePool(cache, options.samples_in_memory, rng, max_samples, options.size_weighting)
    own = SamplePool(own_cache, options.samples_in_memory, rng, size_weighting=options.size_weighting)
    if share == 1.0:
        return own
    synthetic = SamplePool(cache, options.samples_in_memory, rng, max_samples, options.size_weighting)
    return MixedPool([synthetic, own], [1.0 - share, share], rng)


def _save_latest(work_dir: Path, network, optimizer, state: TrainingState, rng: np.random.Generator,
                 config: LiteModelConfig) -> None:
    payload = {
        "network_weights": network.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "state": json.dumps(asdict(state)),
        "rng_state": json.dumps(rng.bit_generator.state),
        "config": json.dumps(asdict(config)),
    }
    tmp = work_dir / (LATEST + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(work_dir / LATEST)


def _load_latest(work_dir: Path, network, optimizer, rng: np.random.Generator, config: LiteModelConfig) -> TrainingState:
    checkpoint = load_checkpoint_file(work_dir / LATEST)
    fields_ = json.loads(checkpoint["config"])
    saved = LiteModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields_.items()})
    if saved != config:
        raise LesionLocatorError(f"{work_dir / LATEST} was trained with another model configuration ({saved}); "
                                 "use the same options or another --work-dir.")
    network.load_state_dict(checkpoint["network_weights"])
    optimizer.load_state_dict(checkpoint["optimizer_state"])
    rng.bit_generator.state = json.loads(checkpoint["rng_state"])
    return TrainingState(**json.loads(checkpoint["state"]))


def initial_weights(source: str | Path, task: str = "point") -> dict[str, torch.Tensor]:
    """Network weights from a model root (its network for `task`), a model folder, or a checkpoint file."""
    source = Path(source)
    if source.is_file():
        return load_checkpoint_file(source)["network_weights"]
    return load_checkpoint_folder(resolve_task_folder(source, task), folds=[0]).fold_weights[0]


def progress_bar(step: int, total: int, loss: float, seconds_per_step: float) -> None:
    """One updating line on stderr."""
    width = 30
    done = int(width * step / max(total, 1))
    eta = (total - step) * seconds_per_step
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.4f} "
                     f"{seconds_per_step:.2f} s/step eta {eta / 60:.0f} min ")
    sys.stderr.flush()


def check_fresh_start(work_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start afresh over an earlier run's resumable checkpoint (hours of training) unless asked to."""
    latest = Path(work_dir) / LATEST
    if latest.is_file() and not (resume or overwrite):
        raise LesionLocatorError(
            f"{latest} holds an earlier training run; nothing was overwritten. Add --resume to continue it, "
            "--overwrite to start again and replace it, or give another --work-dir (resume=True or overwrite=True "
            "in Python).")


def _setup(config: LiteModelConfig, options: TrainingOptions, work_dir: Path, resume: bool, rng: np.random.Generator):
    """Network (on its device), optimizer and state: fresh, from `init_weights`, or resumed from work_dir."""
    device = resolve_device(options.device)
    network = build_lite_network(config)
    if options.init_weights is not None and not resume:
        network.load_state_dict(initial_weights(options.init_weights, options.init_task), strict=True)
    network = network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    state = TrainingState()
    if resume:
        if not (work_dir / LATEST).is_file():
            raise LesionLocatorError(f"Nothing to resume: {work_dir / LATEST} does not exist.")
        state = _load_latest(work_dir, network, optimizer, rng, config)
    return network, optimizer, state, device


def _step(network, optimizer, inputs: np.ndarray, targets: np.ndarray, learning_rate: float,
          options: TrainingOptions, device: torch.device) -> float:
    """One optimizer step; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.zero_grad(set_to_none=True)
    outputs = network(torch.from_numpy(inputs).to(device))
    target = torch.from_numpy(targets).to(device)
    loss = deep_supervision_loss(outputs, target) if options.deep_supervision else dice_ce_loss(outputs, target)
    if not torch.isfinite(loss):  # stop before the weights take it in
        raise LesionLocatorError(f"The training loss became {loss.item()}; this step did not change the weights. "
                                 "Run the same command with --resume and a lower --lr to go on from the work "
                                 "folder's last checkpoint.")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
    optimizer.step()
    return float(loss.item())


def train(config: LiteModelConfig, options: TrainingOptions, cache: str | Path, work_dir: str | Path,
          resume: bool = False, progress: Callable[[int, int, float, float], None] | None = progress_bar,
          max_samples: int | None = None, own_cache: str | Path | None = None,
          overwrite: bool = False) -> tuple[torch.nn.Module, TrainingState]:
    """Train (or continue) the Lite network on the samples cached in `cache` (the first `max_samples`), mixed with
    the user's own samples in `own_cache` at `options.own_data_share`; returns the network (in inference form,
    without deep supervision) and the state reached. A fresh run replaces an earlier checkpoint in `work_dir` only
    with `overwrite`."""
    work_dir = Path(work_dir)
    check_fresh_start(work_dir, resume, overwrite)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    network, optimizer, state, device = _setup(config, options, work_dir, resume, rng)
    pool = _sample_pool(Path(cache), Path(own_cache) if own_cache else None, options, rng, max_samples)
    patch_size = tuple(options.patch_size_zyx or config.patch_size_zyx)
    network.decoder.deep_supervision = options.deep_supervision
    network.train()
    started, first_step, earlier_seconds = time.time(), state.step, state.seconds
    interval_losses: list[float] = []
    while state.step < options.steps:
        if options.time_limit_s is not None and time.time() - started > options.time_limit_s:
            break
        inputs, targets = make_batch(pool.draw(options.batch_size), patch_size, config.spacing_zyx, rng,
                                     options.prompt_mix)
        interval_losses.append(_step(network, optimizer, inputs, targets, poly_learning_rate(state.step, options),
                                     options, device))
        state.step += 1
        state.seconds = earlier_seconds + time.time() - started
        if state.step % 4 == 0:
            pool.refresh_one()
        if state.step % 100 == 0:
            pool.rescan()  # samples still being generated join the pool
        if state.step % options.log_every == 0 or state.step == options.steps:
            state.losses.append(float(np.mean(interval_losses)))
            interval_losses = []
            if progress is not None:
                seconds_per_step = (time.time() - started) / (state.step - first_step)
                progress(state.step, options.steps, state.losses[-1], seconds_per_step)
        if state.step % options.checkpoint_every == 0:
            _save_latest(work_dir, network, optimizer, state, rng, config)
    network.decoder.deep_supervision = False
    _save_latest(work_dir, network, optimizer, state, rng, config)
    (work_dir / "training_log.json").write_text(json.dumps({**asdict(state), "options": asdict(options)}, indent=1))
    return network, state


def export_model(network: torch.nn.Module, config: LiteModelConfig, model_root: str | Path, state: TrainingState,
                 tasks: tuple[str, ...] = TASKS, net_folder: str = NET_FOLDER) -> Path:
    """Write the trained network into an official-format model root (fp32 weights, no optimizer state), serving
    `tasks` from `net_folder`."""
    weights = {k: v.detach().float().cpu() for k, v in network.state_dict().items()}
    return write_model_root(model_root, config, weights, {"current_epoch": state.step}, tasks, net_folder)
