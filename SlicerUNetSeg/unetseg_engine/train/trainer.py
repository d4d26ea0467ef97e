"""The training loop: patches from cached cases, MONAI augmentation, validation Dice, checkpoints.

Its result is a model package in the engine's format, so a trained model is used exactly like a
shipped one. Runs on CUDA with mixed precision and channels-last when present, otherwise on the CPU,
channels-last with bfloat16 autocast where the CPU has native bfloat16 (AVX512-BF16 or AMX).

Partially contoured cases (``partial_labels`` in dataset.json, or extra datasets given with
``extra_datasets``) are trained with the marginal loss (``losses.py``), and validated per organ only
where that organ was contoured.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CancelledError, UNetSegError
from ..modelpkg import write_package
from .dataset import Case, fingerprint, load_dataset, prepare_case
from .losses import MarginalDiceCELoss
from .planner import plan_experiment
from .sampling import BalancedSampler

LOSSES = ("dice_ce", "dice_focal", "bce_dice")
PRECISIONS = ("auto", "fp32", "bf16")
SAMPLINGS = ("classes", "balanced")


@dataclass
class TrainConfig:
    dataset: Path
    output: Path
    model_id: str
    version: str = "1.0.0"  # of the exported package
    title: str = ""
    description: str = ""
    licence: str = "unspecified"
    architecture: str = "UNet"
    spatial_dims: int = 3
    loss: str = "dice_ce"
    iterations: int = 2000
    batch_size: int = 2
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 12.0
    val_every: int = 250
    seed: int = 0
    val_fraction: float = 0.2
    fold: int | None = None  # cross-validation fold (of splits.json's list, or of ``n_folds``)
    n_folds: int = 5
    spacing: list[float] | None = None
    patch_size: list[int] | None = None
    window: tuple[float, float] | None = None
    base_features: int = 16
    device: str = "auto"
    resume: bool = False
    elastic: bool = False
    coarse_dropout: bool = False
    flip_axes: list[str] = field(default_factory=list)
    # left/right label pairs, e.g. [["RightParotid", "LeftParotid"]]: mirror left-right in training
    # with the pair's labels swapped, and declare the same for test-time augmentation
    mirror_pairs: list[list[str]] = field(default_factory=list)
    label_info: dict[str, Any] = field(default_factory=dict)
    time_limit_min: float | None = None
    num_threads: int | None = None
    init_from: str | None = None  # a model package (id or folder) whose plan and weights to start from
    # stochastic weight averaging: from this fraction of the run (iterations or time, whichever is
    # further along) the learning rate stays where it is and the exported weights are the average of
    # snapshots taken every ``swa_every`` iterations (torch.optim.swa_utils.AveragedModel)
    swa_start: float | None = None
    swa_every: int = 25
    # more nnU-Net dataset folders with the same labels (often partially contoured); each is split by
    # its own splits file or, without one, by the fixed shuffle holding out ``val_fraction``
    extra_datasets: list[str] = field(default_factory=list)
    precision: str = "auto"  # CPU: bf16 autocast where the CPU has native bfloat16, else fp32
    # patch centres: "classes" (MONAI's RandCropByLabelClassesd, foreground twice as often per class
    # as background) or "balanced" (an organ drawn uniformly, then a case that contoured it, then a
    # voxel of it; or, one time in n_classes, anywhere in a random case): rare organs that only some
    # cases contoured are seen as often as common ones
    sampling: str = "classes"
    # the cases to train and validate on, by name ({"train": [...], "validation": [...]}), instead of
    # the dataset's split; ``unetseg finetune`` sets it (validation may be empty: it evaluates itself)
    cases: dict[str, list[str]] | None = None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _resolve_precision(name: str, device) -> str:
    """'fp16' (CUDA autocast), 'bf16' (CPU autocast) or 'fp32'."""
    if name not in PRECISIONS:
        raise UNetSegError(f"Unknown precision '{name}'. Choose from {', '.join(PRECISIONS)}.")
    if device.type == "cuda":
        return "fp16"
    if name == "bf16" and not cpu_has_bf16():
        raise UNetSegError("--precision bf16 was asked for, but this CPU has no native bfloat16 "
                           "(AVX512-BF16 or AMX). Use --precision fp32 or auto.")
    return "bf16" if name == "bf16" or (name == "auto" and cpu_has_bf16()) else "fp32"


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UNetSegError("--device cuda was asked for, but PyTorch sees no CUDA GPU. Use --device cpu.")
    return torch.device(name)


def build_loss(name: str, multilabel: bool):
    from monai.losses import DiceCELoss, DiceFocalLoss

    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "dice_focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "bce_dice":  # one sigmoid channel per label; targets made multi-hot by the caller
        return DiceCELoss(sigmoid=True, batch=True)
    raise UNetSegError(f"Unknown loss '{name}'. Choose from {', '.join(LOSSES)}.")


def mirror_transform(swap_values: dict[int, int], prob: float = 0.5):
    """A random left-right mirror of (C, z, y, x) image and label arrays that also swaps the values
    of paired labels (the right parotid of a mirrored neck is where a left one would be)."""
    from monai.transforms import MapTransform, RandomizableTransform

    lut = np.arange(max([*swap_values, *swap_values.values(), 0]) + 1)
    for a, b in swap_values.items():
        lut[a] = b

    class RandMirrorSwapd(RandomizableTransform, MapTransform):
        def __init__(self):
            RandomizableTransform.__init__(self, prob)
            MapTransform.__init__(self, ["image", "label"])

        def __call__(self, data):
            self.randomize(None)
            if not self._do_transform:
                return data
            d = dict(data)
            d["image"] = np.ascontiguousarray(np.asarray(d["image"])[..., ::-1])
            label = np.asarray(d["label"])[..., ::-1]
            inside = label < lut.size
            swapped = label.copy()
            swapped[inside] = lut[label[inside].astype(np.intp)]
            d["label"] = swapped
            if "labelled" in d:  # the right parotid contoured is now a left one contoured
                labelled = np.asarray(d["labelled"])
                source = np.arange(labelled.size)  # the value each class was before the mirror
                source[: lut.size] = lut
                d["labelled"] = labelled[source]
            return d

    return RandMirrorSwapd()


def build_augmentation(patch_zyx, n_classes: int, cfg: TrainConfig,
                       swap_values: dict[int, int] | None = None):
    """MONAI dictionary transforms on (C, z, y, x) arrays. No left-right flip unless asked, because
    paired organs (left/right parotid) have their own labels; ``swap_values`` (from
    ``cfg.mirror_pairs``) mirrors left-right and swaps those labels instead.

    With ``cfg.sampling == "classes"`` the chain crops the patch itself (and returns a list of one
    sample); with "balanced" it is given patches already cropped by ``BalancedSampler``."""
    from monai import transforms as T

    keys = ["image", "label"]
    axis_of = {"z": 0, "y": 1, "x": 2}
    chain: list[Any] = []  # MONAI types its chains as lazy transforms only
    if cfg.sampling == "classes":
        ratios = [1.0] + [2.0] * (n_classes - 1)  # foreground patches twice as often per class
        chain += [
            T.SpatialPadd(keys, spatial_size=patch_zyx, mode="constant"),
            T.RandCropByLabelClassesd(keys, label_key="label", spatial_size=patch_zyx,
                                      num_classes=n_classes, ratios=ratios, num_samples=1),
        ]
    chain += [
        T.RandAffined(keys, prob=0.25, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15,) * 3,
                      mode=("bilinear", "nearest"), padding_mode="border"),
    ]
    if cfg.elastic:
        chain.append(T.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=0.1,
                                      mode=("bilinear", "nearest"), padding_mode="border"))
    chain += [
        T.RandGaussianNoised("image", prob=0.15, std=0.03),
        T.RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
        T.RandScaleIntensityd("image", prob=0.15, factors=0.1),
    ]
    if cfg.coarse_dropout:
        chain.append(T.RandCoarseDropoutd("image", holes=4, spatial_size=[max(p // 8, 1) for p in
                                                                          patch_zyx], prob=0.2))
    for axis in cfg.flip_axes:
        chain.append(T.RandFlipd(keys, prob=0.5, spatial_axis=axis_of[axis]))
    if swap_values:
        chain.append(mirror_transform(swap_values))
    return T.Compose(chain)


def dice_per_label(pred: np.ndarray, ref: np.ndarray, values: list[int]) -> list[float]:
    from ..metrics import dice

    return [dice(pred == v, ref == v) for v in values]


@dataclass
class TrainingState:
    """What the loop changes (and a checkpoint keeps): the network and its optimiser, the iterations
    done, the history, the weight average, and the random streams that draw the patches."""

    core: Any  # the network as built: its weights are what is exported
    network: Any  # ``core`` taking volumes, on the device
    optimizer: Any
    scheduler: Any  # LambdaLR over ``Trainer.lr_factor``
    scaler: Any  # CUDA's gradient scaler (a no-op elsewhere)
    channels_last: bool
    train_data: list[dict[str, Any]]
    val_data: list[dict[str, Any]]
    clock_start: float  # on the trainer's clock, less the time of the runs this one resumes
    iteration: int = 0  # steps done
    history: dict[str, list[Any]] = field(default_factory=lambda: {
        "iteration": [], "loss": [], "val_iteration": [], "val_dice": []})
    averaged: Any = None  # torch.optim.swa_utils.AveragedModel, once averaging has begun
    augment: Any = None  # MONAI's Compose (build_augmentation)
    loss_fn: Any = None
    rng: np.random.Generator = field(default_factory=np.random.default_rng)  # picks cases
    sampler: BalancedSampler | None = None  # shares ``rng``


def _augmentation_streams(augment: Any) -> list[np.random.RandomState]:
    """Every random stream of a MONAI transform chain (each randomised transform has its own ``R``,
    and some hold inner transforms with theirs), in a fixed order."""
    from monai.transforms import Transform

    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def walk(item: Any) -> None:
        if id(item) in seen:
            return
        seen.add(id(item))
        if isinstance(item, np.random.RandomState):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            for part in item:
                walk(part)
        elif isinstance(item, Transform):
            for _, value in sorted(vars(item).items()):
                walk(value)

    walk(augment)
    return found


def random_states(state: TrainingState) -> tuple[dict[str, Any], Any]:
    """The random streams of the loop as JSON (numpy's) and a tensor (torch's CPU generator), so a
    resumed run draws the patches the uninterrupted one would have drawn."""
    import torch

    streams = []
    for stream in _augmentation_streams(state.augment):
        name, keys, pos, has_gauss, gauss = stream.get_state()
        streams.append([name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)])
    return {"cases": state.rng.bit_generator.state, "augmentation": streams}, torch.get_rng_state()


def set_random_states(state: TrainingState, saved: dict[str, Any], torch_state: Any) -> None:
    import torch

    state.rng.bit_generator.state = saved["cases"]  # the sampler holds the same generator
    streams = _augmentation_streams(state.augment)
    if len(streams) != len(saved["augmentation"]):  # another augmentation chain: keep the reseeding
        return
    for stream, (name, keys, pos, has_gauss, gauss) in zip(streams, saved["augmentation"]):
        stream.set_state((name, np.array(keys, np.uint32), pos, has_gauss, gauss))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


class Trainer:
    """Trains one model: ``run()`` is ``setup()``, then ``train_step()`` per iteration with
    ``validate()`` and ``save_checkpoint()`` every ``val_every``, then ``export()``; each piece can be
    called on its own (the tests do). ``plan()`` needs only the constructor.

    ``progress(fraction)`` is called after every iteration; ``cancel()`` returning True stops the
    run between iterations with CancelledError (nothing is exported). ``clock`` gives the seconds that
    count against ``time_limit_min`` (``time.time``; a test passes its own to be independent of speed).
    """

    def __init__(self, cfg: TrainConfig, progress: Callable[[float], None] | None = None,
                 cancel: Callable[[], bool] | None = None, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.progress_callback = progress
        self.cancel_callback = cancel
        self.clock = clock
        # resolved here, not in run(): planning depends on the device (patch size for a GPU)
        self.device = _resolve_device(cfg.device)
        self.precision = _resolve_precision(cfg.precision, self.device)
        self.plan_: dict[str, Any] = {}  # set by setup(): the plan trained with
        self.dataset = load_dataset(cfg.dataset)
        if cfg.cases is not None:
            by_name = {c.name: c for c in self.dataset.cases}
            unknown = sorted(set(cfg.cases["train"] + cfg.cases["validation"]) - set(by_name))
            if unknown or not cfg.cases["train"]:
                raise UNetSegError(f"The cases to train on must be cases of {self.dataset.root} "
                                   f"(unknown: {', '.join(unknown) or 'none'}), at least one.")
            self.train_cases = [by_name[n] for n in cfg.cases["train"]]
            self.val_cases = [by_name[n] for n in cfg.cases["validation"]]
        else:
            # The split never follows --seed: models trained with other seeds (to ensemble them) or
            # on other folds must agree on which cases each one has not seen.
            self.train_cases, self.val_cases = self.dataset.split(cfg.val_fraction, fold=cfg.fold,
                                                                  n_folds=cfg.n_folds)
        self.label_values = sorted(self.dataset.labels.values())
        self.label_names = {v: k for k, v in self.dataset.labels.items()}
        # validation cases by dataset, each reported on its own (the first is the main dataset)
        self.val_groups: dict[str, list[Case]] = {self.dataset.root.name: list(self.val_cases)}
        for folder in cfg.extra_datasets:
            extra = load_dataset(folder)
            if extra.labels != self.dataset.labels or extra.channel_names != self.dataset.channel_names:
                raise UNetSegError(f"Extra dataset '{folder}' has labels {extra.labels} and channels "
                                   f"{extra.channel_names}; the main dataset has {self.dataset.labels} "
                                   f"and {self.dataset.channel_names}. They must be the same.")
            train, val = extra.split(cfg.val_fraction)
            self.train_cases += train
            self.val_cases += val
            self.val_groups[extra.root.name] = val
        self.multilabel = cfg.loss == "bce_dice"
        self.partial = any(c.is_partial(self.label_values) for c in self.train_cases + self.val_cases)
        if self.partial and cfg.loss != "dice_ce":
            raise UNetSegError(f"Some cases are partially contoured (partial_labels); they are trained "
                               f"with the marginal Dice + cross-entropy, so use --loss dice_ce, not "
                               f"{cfg.loss}.")
        if cfg.sampling not in SAMPLINGS:
            raise UNetSegError(f"Unknown sampling '{cfg.sampling}'. Choose from {', '.join(SAMPLINGS)}.")
        if cfg.swa_start is not None and not 0 <= cfg.swa_start < 1:
            raise UNetSegError(f"--swa-start {cfg.swa_start}: give the fraction of the run after which "
                               "weights are averaged, from 0 (the whole run) to below 1.")
        if cfg.swa_every < 1:
            raise UNetSegError(f"--swa-every {cfg.swa_every}: give a number of iterations, at least 1.")
        self.swap_values: dict[int, int] = {}
        if cfg.mirror_pairs and "x" in cfg.flip_axes:
            raise UNetSegError("Use either --flip-axes x or --mirror-pairs: both mirror left-right.")
        for pair in cfg.mirror_pairs:
            unknown = [n for n in pair if n not in self.dataset.labels]
            if len(pair) != 2 or unknown:
                raise UNetSegError(f"Mirror pair {pair}: give two label names of this dataset "
                                   f"({', '.join(self.dataset.labels)}).")
            a, b = (self.dataset.labels[n] for n in pair)
            self.swap_values.update({a: b, b: a})

    # ---- planning and data ------------------------------------------------------------------
    def plan(self) -> dict[str, Any]:
        modality = "CT" if self.dataset.channel_names[0].upper() == "CT" else "MR"
        threshold = -500.0 if modality == "CT" else None
        self.log(f"Fingerprinting {len(self.train_cases)} training cases...")
        fp = fingerprint(self.dataset, self.train_cases, threshold)
        plan = plan_experiment(fp, modality, architecture=self.cfg.architecture,
                               spatial_dims=self.cfg.spatial_dims, spacing=self.cfg.spacing,
                               patch_size=self.cfg.patch_size, window=self.cfg.window,
                               base_features=self.cfg.base_features,
                               gpu=self.device.type == "cuda")
        plan["fingerprint"], plan["modality"] = fp, modality
        return plan

    def plan_from_package(self, package) -> dict[str, Any]:
        """Continue training an existing model: its grid, normalisation and network, unchanged.

        The patch size may change (``--patch-size``): the networks are fully convolutional.
        """
        meta = package.meta
        if [label["name"] for label in meta["labels"]] != [self.label_names[v] for v in
                                                             self.label_values]:
            raise UNetSegError(f"Model '{package.id}' has labels {package.label_names}; the dataset "
                               f"has {list(self.dataset.labels)}. They must match to continue training.")
        patch = self.cfg.patch_size or meta["inference"]["patch_size"]
        return {"preprocessing": meta["preprocessing"], "network": meta["network"],
                "patch_size": [int(p) for p in patch], "modality": meta["modality"],
                "fingerprint": meta.get("training", {}).get("fingerprint"),
                "init_from": {"id": package.id, "version": meta["version"],
                              "sha256": package.weights_key}}

    def load_cases(self, cases: list[Case]) -> list[dict[str, Any]]:
        """Each case on its model grid, decoded once and kept in memory for the whole run, with
        ``labelled``: a bool per class (background first), True where that class was contoured."""
        from concurrent.futures import ThreadPoolExecutor

        n_classes = len(self.label_values) + 1

        def load(case: Case) -> dict[str, Any]:
            image, label = prepare_case(case, self.plan_["preprocessing"])
            labelled = np.ones(n_classes, bool)
            if case.labelled is not None:
                labelled[1:] = [v in case.labelled for v in self.label_values]
            return {"image": image, "label": label[None], "name": case.name, "labelled": labelled}

        with ThreadPoolExecutor(2) as pool:  # SimpleITK's reading and resampling release the GIL
            return list(pool.map(load, cases))

    @staticmethod
    def log(message: str) -> None:
        print(message, flush=True)

    def check_cancelled(self) -> None:
        if self.cancel_callback is not None and self.cancel_callback():
            raise CancelledError("Training was cancelled; nothing was exported.")

    # ---- the loop, in pieces -------------------------------------------------------------------
    @property
    def warmup(self) -> int:
        return max(1, min(100, self.cfg.iterations // 20))

    @property
    def budget_s(self) -> float | None:
        return self.cfg.time_limit_min * 60 if self.cfg.time_limit_min else None

    def progress_fraction(self, state: TrainingState, it: int) -> float:
        """Fraction of the run done after warm-up: of the iterations or, with a time limit, of the
        time, whichever is further along."""
        done = (it - self.warmup) / max(1, self.cfg.iterations - self.warmup)
        budget = self.budget_s
        if budget:
            done = max(done, (self.clock() - state.clock_start) / budget)
        return min(max(done, 0.0), 1.0)

    def lr_factor(self, state: TrainingState, it: int) -> float:
        """Linear warm-up, then nnU-Net's polynomial decay (power 0.9), so a run cut by the clock
        still ends with a small learning rate. With weight averaging the rate is held from
        ``swa_start`` on: the snapshots must keep moving for their average to be worth having."""
        if it < self.warmup:
            return (it + 1) / self.warmup
        done = self.progress_fraction(state, it)
        if self.cfg.swa_start is not None:
            done = min(done, self.cfg.swa_start)
        return float(max(0.0, 1 - done) ** 0.9)

    def setup(self) -> TrainingState:
        """Seeds, the plan (from the checkpoint when resuming, else from ``init_from`` or the data),
        the cases on the model grid, the network, optimiser and schedule, and, when resuming, the
        checkpoint's weights, history, iteration and random states."""
        import torch
        from monai.utils import set_determinism

        from ..networks import build_network, volume_network

        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        set_determinism(seed=cfg.seed)
        cfg.output.mkdir(parents=True, exist_ok=True)
        ckpt = self.checkpoint() if cfg.resume else None
        init = None
        if ckpt is not None:
            self.plan_ = json.loads(ckpt["plan_json"])
        elif cfg.init_from:
            from ..modelpkg import get_model

            init = get_model(cfg.init_from)
            self.plan_ = self.plan_from_package(init)
        else:
            self.plan_ = self.plan()
        (cfg.output / "plan.json").write_text(json.dumps(self.plan_, indent=2))
        self.log(f"Plan: spacing {self.plan_['preprocessing']['spacing_mm']} mm, patch "
                 f"{self.plan_['patch_size']} (x, y, z), {self.plan_['network']['architecture']} "
                 f"{self.plan_['network']['params']}, normalisation "
                 f"{self.plan_['preprocessing']['normalization']}, device {self.device}, "
                 f"precision {self.precision}")
        t0 = time.time()
        self.check_cancelled()
        train_data = self.load_cases(self.train_cases)
        self.check_cancelled()
        val_data = self.load_cases(self.val_cases)
        n_partial = sum(c.is_partial(self.label_values) for c in self.train_cases)
        self.log(f"Prepared {len(train_data)} training cases ({n_partial} partially contoured) and "
                 f"{len(val_data)} validation cases in {time.time() - t0:.1f} s")

        net_spec = self.plan_["network"]
        n_classes = len(self.label_values) + 1
        out_channels = n_classes - 1 if self.multilabel else n_classes
        core = build_network(net_spec["architecture"], net_spec["spatial_dims"],
                             len(self.dataset.channel_names), out_channels, net_spec["params"])
        network = volume_network(core, net_spec["spatial_dims"]).to(self.device)
        # channels-last: on CUDA for the tensor cores, on the CPU for oneDNN's fast 3D kernels
        channels_last = net_spec["spatial_dims"] == 3 and (self.device.type == "cuda" or
                                                           self.precision == "bf16")
        if channels_last:
            network = network.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
        # Training time counts across resumed runs: the time limit and the decay that follows it
        # go on from where the checkpoint left them, rather than starting afresh.
        elapsed = float(ckpt.get("elapsed_s", 0.0)) if ckpt is not None else 0.0
        state = TrainingState(core=core, network=network, optimizer=optimizer, scheduler=None,
                              scaler=torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda"),
                              channels_last=channels_last, train_data=train_data, val_data=val_data,
                              clock_start=self.clock() - elapsed)
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                             lambda it: self.lr_factor(state, it))
        if init is not None:
            core.load_state_dict(init.load_state_dict())
            self.log(f"Starting from the weights of model '{init.id}' v{init.meta['version']}")
        if ckpt is not None:
            self.resume_from(state, ckpt)

        patch_zyx = list(reversed(self.plan_["patch_size"]))
        state.augment = build_augmentation(patch_zyx, n_classes, cfg, self.swap_values)
        state.augment.set_random_state(seed=cfg.seed + state.iteration)
        marginal = cfg.loss == "dice_ce"  # equals MONAI's DiceCELoss on fully contoured cases
        state.loss_fn = MarginalDiceCELoss() if marginal else build_loss(cfg.loss, self.multilabel)
        state.rng = np.random.default_rng(cfg.seed + state.iteration)
        state.sampler = BalancedSampler(train_data, self.label_values, patch_zyx, state.rng) \
            if cfg.sampling == "balanced" else None
        if ckpt is not None and ckpt.get("random_json"):  # the exact random streams, where saved
            set_random_states(state, json.loads(ckpt["random_json"]), ckpt.get("torch_random"))
        network.train()
        return state

    def checkpoint(self) -> dict[str, Any] | None:
        """The run's checkpoint (``checkpoint.pt`` in the output folder), or None without one."""
        import torch

        path = self.cfg.output / "checkpoint.pt"
        if not path.is_file():
            return None
        return dict(torch.load(path, map_location="cpu", weights_only=True))

    def resume_from(self, state: TrainingState, ckpt: dict[str, Any]) -> None:
        """Weights, optimiser, schedule, history, iteration and weight average from a checkpoint."""
        import torch

        state.core.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        assert state.scheduler is not None
        state.scheduler.load_state_dict(ckpt["scheduler"])
        state.history = json.loads(ckpt["history_json"])
        state.iteration = int(ckpt["iteration"])
        if ckpt.get("averaged") is not None:
            state.averaged = torch.optim.swa_utils.AveragedModel(state.core)
            state.averaged.load_state_dict(ckpt["averaged"])
        self.log(f"Resumed from {self.cfg.output / 'checkpoint.pt'} at iteration {state.iteration}, "
                 f"after {(self.clock() - state.clock_start) / 60:.1f} min of training")

    def batch(self, state: TrainingState) -> tuple[Any, Any, Any]:
        """``batch_size`` augmented patches: images (B, C, ...), labels (B, 1, ...), labelled (B, n)."""
        import torch

        images, labels, labelled = [], [], []
        for _ in range(self.cfg.batch_size):
            if state.sampler is not None:
                sample = state.augment(state.sampler.sample())
            else:
                sample = state.augment(state.train_data[state.rng.integers(len(state.train_data))])[0]
            images.append(torch.as_tensor(sample["image"]))
            labels.append(torch.as_tensor(sample["label"]))
            labelled.append(torch.as_tensor(np.asarray(sample["labelled"])))
        return torch.stack(images).float(), torch.stack(labels).long(), torch.stack(labelled)

    def _autocast(self) -> dict[str, Any]:
        import torch

        return dict(device_type=self.device.type, enabled=self.precision != "fp32",
                    dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def compute_loss(self, state: TrainingState, images: Any, labels: Any, labelled: Any) -> Any:
        import torch

        from ..networks import main_output

        with torch.autocast(**self._autocast()):
            output = main_output(state.network(images)).float()
        if self.cfg.loss == "dice_ce":
            return state.loss_fn(output, labels, labelled)
        if self.multilabel:
            values = torch.tensor(self.label_values).view(1, -1, *([1] * (labels.dim() - 2)))
            labels = (labels == values).float()
        return state.loss_fn(output, labels)

    def train_step(self, state: TrainingState, batch: tuple[Any, Any, Any] | None = None) -> float:
        """One optimiser step (iteration ``state.iteration + 1``) on ``batch`` (by default the next
        one ``batch()`` draws); returns its loss. ``after_step`` does the bookkeeping."""
        import torch

        images, labels, labelled = batch if batch is not None else self.batch(state)
        images, labels = images.to(self.device), labels.to(self.device)
        if state.channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        state.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_loss(state, images, labels, labelled)
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.network.parameters(), self.cfg.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        assert state.scheduler is not None
        state.scheduler.step()
        state.iteration += 1
        return float(loss.item())

    def after_step(self, state: TrainingState, loss: float) -> None:
        """Progress, cancel, the weight-averaging snapshot and the history, after a step."""
        import torch

        cfg, done = self.cfg, state.iteration
        if self.progress_callback is not None:
            self.progress_callback(self.progress_fraction(state, done) if self.budget_s else
                                   done / cfg.iterations)
        self.check_cancelled()
        if cfg.swa_start is not None and done % cfg.swa_every == 0 and \
                done > self.warmup and self.progress_fraction(state, done) >= cfg.swa_start:
            if state.averaged is None:
                state.averaged = torch.optim.swa_utils.AveragedModel(state.core)
                assert state.scheduler is not None
                self.log(f"Weight averaging starts at iteration {done}, learning rate held at "
                         f"{state.scheduler.get_last_lr()[0]:.2e}")
            state.averaged.update_parameters(state.core)
        state.history["iteration"].append(done)
        state.history["loss"].append(loss)

    def validate(self, state: TrainingState) -> list[float]:
        """Dice per label on the validation cases, of the weights that would be exported now:
        per dataset, each organ over the cases that contoured it. Returns the main dataset's
        (empty when there are no validation cases)."""
        import torch
        from monai.inferers import sliding_window_inference

        from ..networks import volume_network

        if not state.val_data:
            return []
        it, averaged = state.iteration, state.averaged
        spatial_dims = self.plan_["network"]["spatial_dims"]
        model = state.network if averaged is None else volume_network(averaged.module, spatial_dims)
        model.eval()
        patch_zyx = list(reversed(self.plan_["patch_size"]))
        scores = []
        with torch.inference_mode():
            for case in state.val_data:
                x = torch.as_tensor(case["image"])[None].to(self.device)
                if state.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                with torch.autocast(**self._autocast()):
                    logits = sliding_window_inference(x, roi_size=patch_zyx, sw_batch_size=4, overlap=0.5,
                                                      mode="gaussian", predictor=model)
                if self.multilabel:
                    probs = torch.sigmoid(logits[0].float()).cpu().numpy() > 0.5
                    pred = np.zeros(probs.shape[1:], np.uint8)
                    for c, v in enumerate(self.label_values):
                        pred[probs[c]] = v
                else:
                    pred = logits[0].argmax(0).cpu().numpy()
                case_scores = dice_per_label(pred, case["label"][0], self.label_values)
                scores.append([d if case["labelled"][v] else math.nan
                               for v, d in zip(self.label_values, case_scores)])
        state.network.train()
        of = "" if averaged is None else f" of the average of {int(averaged.n_averaged)} snapshots"
        results, start = {}, 0
        for group, cases in self.val_groups.items():
            if not cases:
                continue
            block = np.array(scores[start:start + len(cases)], dtype=float)
            start += len(cases)
            with warnings.catch_warnings():  # an organ no case of the group contoured: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                per_label = np.nanmean(block, axis=0).tolist()
            results[group] = per_label
            names = " ".join(f"{self.label_names[v]}={d:.3f}" for v, d in zip(self.label_values,
                                                                             per_label))
            self.log(f"  validation{of} at {it} on {group} ({len(cases)} cases): mean Dice "
                     f"{np.nanmean(per_label):.3f} ({names})")
        main = next(iter(results.values()))
        state.history["val_iteration"].append(it)
        state.history["val_dice"].append(main)
        state.history.setdefault("val_dice_by_dataset", []).append(results)
        return main

    def save_checkpoint(self, state: TrainingState) -> Path:
        """Everything ``setup()`` needs to go on from here, random streams included; written to a
        temporary file first, so a kill mid-write leaves the previous checkpoint."""
        import torch

        random_json, torch_random = random_states(state)
        checkpoint = {"model": state.core.state_dict(), "optimizer": state.optimizer.state_dict(),
                      "scheduler": state.scheduler.state_dict() if state.scheduler else None,
                      "iteration": state.iteration, "plan_json": json.dumps(self.plan_),
                      "history_json": json.dumps(state.history),
                      "averaged": None if state.averaged is None else state.averaged.state_dict(),
                      "elapsed_s": self.clock() - state.clock_start,
                      "random_json": json.dumps(random_json), "torch_random": torch_random}
        path = self.cfg.output / "checkpoint.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(path)
        return path

    def run(self) -> Path:
        """Set up, train to ``iterations`` (or the time limit), and export the model package."""
        cfg = self.cfg
        state = self.setup()
        budget = self.budget_s
        deadline = state.clock_start + budget if budget else math.inf
        tick = time.time()
        while state.iteration < cfg.iterations:
            loss = self.train_step(state)
            self.after_step(state, loss)
            done = state.iteration
            if done % 25 == 0:
                rate = 25 / max(time.time() - tick, 1e-9)
                tick = time.time()
                eta = (cfg.iterations - done) / max(rate, 1e-9)
                recent = float(np.mean(state.history["loss"][-25:]))
                assert state.scheduler is not None
                self.log(f"iteration {done}/{cfg.iterations}  loss {recent:.4f}  lr "
                         f"{state.scheduler.get_last_lr()[0]:.2e}  {rate:.2f} it/s  ETA {eta / 60:.1f} min")
            if done % cfg.val_every == 0 or done == cfg.iterations:
                self.validate(state)
                self.save_checkpoint(state)
                plot_curves(state.history, cfg.output / "training_curve.png", self.label_names,
                            self.label_values)
            if self.clock() > deadline:
                self.log(f"Time limit of {cfg.time_limit_min} min reached at iteration {done}.")
                if not state.history["val_iteration"] or state.history["val_iteration"][-1] != done:
                    self.validate(state)
                    self.save_checkpoint(state)
                break
        plot_curves(state.history, cfg.output / "training_curve.png", self.label_names, self.label_values)
        train_time = self.clock() - state.clock_start
        swa = None
        core = state.core
        if state.averaged is not None:
            swa = {"start": cfg.swa_start, "every": cfg.swa_every,
                   "snapshots": int(state.averaged.n_averaged)}
            core = state.averaged.module
        return self.export(core, state.history, train_time, state.iteration, swa)

    # ---- the model package ----------------------------------------------------------------------
    def export(self, core, history: dict[str, list], train_time: float, iterations_done: int,
               swa: dict[str, Any] | None = None) -> Path:
        cfg = self.cfg
        package = cfg.output / "model"
        labels = []
        palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
        for i, value in enumerate(self.label_values):
            name = self.label_names[value]
            info = dict(cfg.label_info.get(name, {}))
            label = {"value": value, "name": info.pop("name", name),
                     "color": info.pop("color", list(palette[i % len(palette)]))}
            label.update(info)
            labels.append(label)
        def rounded(scores: list[float]) -> dict[str, float | None]:  # NaN (never contoured): null
            return {self.label_names[v]: None if math.isnan(d) else round(d, 4)
                    for v, d in zip(self.label_values, scores)}

        last = history["val_dice"][-1] if history["val_dice"] else []
        by_dataset = history.get("val_dice_by_dataset") or [{}]
        val_metrics = rounded(last)
        plan = self.plan_
        meta = {
            "schema_version": 1,
            "id": cfg.model_id,
            "version": cfg.version,
            "title": cfg.title or cfg.model_id,
            "description": cfg.description or f"Trained with unetseg on {self.dataset.meta.get('name')}",
            "licence": cfg.licence,
            "modality": plan["modality"],
            "inputs": [{"name": n} for n in self.dataset.channel_names],
            "network": plan["network"],
            "preprocessing": plan["preprocessing"],
            "inference": {"patch_size": plan["patch_size"], "overlap": 0.5, "sw_batch_size": 2,
                          "blend_mode": "gaussian",
                          **({"tta_flip_axes": ["x"], "tta_mirror_pairs": cfg.mirror_pairs}
                             if cfg.mirror_pairs else {})},
            "output": {"type": "multilabel" if self.multilabel else "multiclass"},
            "labels": labels,
            "training": {
                "dataset": self.dataset.meta.get("name", str(cfg.dataset)),
                "train_cases": [c.name for c in self.train_cases],
                "validation_cases": [c.name for c in self.val_cases],
                **({"fold": cfg.fold} if cfg.fold is not None else {}),
                "iterations": iterations_done, "batch_size": cfg.batch_size, "loss": cfg.loss,
                "learning_rate": cfg.learning_rate, "seed": cfg.seed,
                "device": str(self.device), "time_s": round(train_time, 1),
                "patch_size": plan["patch_size"], "init_from": plan.get("init_from"),
                "weight_averaging": swa,
                "augmentation": {"affine": True, "elastic": cfg.elastic, "noise": True, "gamma": True,
                                 "coarse_dropout": cfg.coarse_dropout, "flip_axes": cfg.flip_axes,
                                 "mirror_pairs": cfg.mirror_pairs},
                "validation_dice_model_grid": val_metrics,
                **({"extra_datasets": [Path(d).name for d in cfg.extra_datasets],
                    "validation_dice_model_grid_by_dataset": {
                        group: rounded(scores) for group, scores in by_dataset[-1].items()}}
                   if cfg.extra_datasets else {}),
                "partially_contoured_train_cases": sum(c.is_partial(self.label_values)
                                                       for c in self.train_cases),
                "precision": self.precision, "sampling": cfg.sampling,
            },
        }
        # the training labels' statistics, for the plausibility flags (review.py; `unetseg model-stats`)
        from ..review import label_statistics

        meta["review"] = label_statistics([str(cfg.dataset), *map(str, cfg.extra_datasets)], labels,
                                          plan["preprocessing"], {c.name for c in self.train_cases})
        written = write_package(package, meta, core.state_dict())
        size_mb = written.weights_bytes / 1e6
        self.log(f"Model package written to {package} ({size_mb:.1f} MB), "
                 f"trained {iterations_done} iterations in {train_time / 60:.1f} min")
        return package


def plot_curves(history, path: Path, label_names: dict[int, str], values: list[int]) -> None:
    """Loss and validation Dice per label against iterations, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience; training goes on without it
        print("matplotlib is not installed: no training curve PNG.", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.asarray(history["loss"])
    if loss.size:
        k = max(1, loss.size // 100)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        a.plot(history["iteration"][: smooth.size], smooth)
    a.set(xlabel="iteration", ylabel="training loss", title="Loss")
    if history["val_dice"]:
        dice = np.asarray(history["val_dice"])
        for c, v in enumerate(values):
            b.plot(history["val_iteration"], dice[:, c], marker=".", label=label_names[v])
        b.plot(history["val_iteration"], dice.mean(axis=1), "k--", label="mean")
        b.legend(fontsize=7)
    b.set(xlabel="iteration", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
