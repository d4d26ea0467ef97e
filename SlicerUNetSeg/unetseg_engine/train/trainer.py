"""The training loop: patches from cached cases, MONAI augmentation, validation Dice, checkpoints.

Its result is a model package in the engine's format, so a trained model is used exactly like a
shipped one. Runs on CUDA with mixed precision and channels-last when present, otherwise on the CPU.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UNetSegError
from ..modelpkg import write_package
from .dataset import Case, fingerprint, load_dataset, prepare_case
from .planner import plan_experiment

LOSSES = ("dice_ce", "dice_focal", "bce_dice")


@dataclass
class TrainConfig:
    dataset: Path
    output: Path
    model_id: str
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
            return d

    return RandMirrorSwapd()


def build_augmentation(patch_zyx, n_classes: int, cfg: TrainConfig,
                       swap_values: dict[int, int] | None = None):
    """MONAI dictionary transforms on (C, z, y, x) arrays. No left-right flip unless asked, because
    paired organs (left/right parotid) have their own labels; ``swap_values`` (from
    ``cfg.mirror_pairs``) mirrors left-right and swaps those labels instead."""
    from monai import transforms as T

    keys = ["image", "label"]
    axis_of = {"z": 0, "y": 1, "x": 2}
    ratios = [1.0] + [2.0] * (n_classes - 1)  # foreground patches twice as often per class
    chain = [
        T.SpatialPadd(keys, spatial_size=patch_zyx, mode="constant"),
        T.RandCropByLabelClassesd(keys, label_key="label", spatial_size=patch_zyx,
                                  num_classes=n_classes, ratios=ratios, num_samples=1),
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


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dataset = load_dataset(cfg.dataset)
        # The split never follows --seed: models trained with other seeds (to ensemble them) or on
        # other folds must agree on which cases each one has not seen.
        self.train_cases, self.val_cases = self.dataset.split(cfg.val_fraction, fold=cfg.fold,
                                                              n_folds=cfg.n_folds)
        self.label_values = sorted(self.dataset.labels.values())
        self.label_names = {v: k for k, v in self.dataset.labels.items()}
        self.multilabel = cfg.loss == "bce_dice"
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

    def load_cases(self, cases: list[Case]) -> list[dict[str, np.ndarray]]:
        out = []
        for case in cases:
            image, label = prepare_case(case, self.plan_["preprocessing"])
            out.append({"image": image, "label": label[None], "name": case.name})
        return out

    @staticmethod
    def log(message: str) -> None:
        print(message, flush=True)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> Path:
        import torch
        from monai.inferers import sliding_window_inference
        from monai.utils import set_determinism

        from ..networks import build_network, main_output, volume_network

        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = _resolve_device(cfg.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        set_determinism(seed=cfg.seed)
        cfg.output.mkdir(parents=True, exist_ok=True)
        ckpt_path = cfg.output / "checkpoint.pt"
        resume = cfg.resume and ckpt_path.is_file()
        init = None
        if resume:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
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
                 f"{self.plan_['preprocessing']['normalization']}, device {self.device}")
        t0 = time.time()
        train_data = self.load_cases(self.train_cases)
        val_data = self.load_cases(self.val_cases)
        self.log(f"Prepared {len(train_data)} training and {len(val_data)} validation cases in "
                 f"{time.time() - t0:.1f} s")

        net_spec = self.plan_["network"]
        n_classes = len(self.label_values) + 1
        out_channels = n_classes - 1 if self.multilabel else n_classes
        core = build_network(net_spec["architecture"], net_spec["spatial_dims"],
                             len(self.dataset.channel_names), out_channels, net_spec["params"])
        network = volume_network(core, net_spec["spatial_dims"]).to(self.device)
        use_cuda = self.device.type == "cuda"
        if use_cuda and net_spec["spatial_dims"] == 3:
            network = network.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
        warmup = max(1, min(100, cfg.iterations // 20))

        budget_s = cfg.time_limit_min * 60 if cfg.time_limit_min else None
        # Training time counts across resumed runs: the time limit and the decay that follows it
        # go on from where the checkpoint left them, rather than starting afresh.
        clock_start = time.time() - (float(ckpt.get("elapsed_s", 0.0)) if resume else 0.0)

        def progress(it: int) -> float:
            """Fraction of the run done after warm-up: of the iterations or, with a time limit, of
            the time, whichever is further along."""
            done = (it - warmup) / max(1, cfg.iterations - warmup)
            if budget_s:
                done = max(done, (time.time() - clock_start) / budget_s)
            return min(max(done, 0.0), 1.0)

        def lr_factor(it: int) -> float:
            """Linear warm-up, then nnU-Net's polynomial decay (power 0.9), so a run cut by the clock
            still ends with a small learning rate. With weight averaging the rate is held from
            ``swa_start`` on: the snapshots must keep moving for their average to be worth having."""
            if it < warmup:
                return (it + 1) / warmup
            done = progress(it)
            if cfg.swa_start is not None:
                done = min(done, cfg.swa_start)
            return max(0.0, 1 - done) ** 0.9

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        scaler = torch.amp.GradScaler("cuda", enabled=use_cuda)
        history: dict[str, list] = {"iteration": [], "loss": [], "val_iteration": [], "val_dice": []}
        start_it = 0
        averaged = None  # the running weight average, once averaging has begun
        if init is not None:
            core.load_state_dict(init.load_state_dict())
            self.log(f"Starting from the weights of model '{init.id}' v{init.meta['version']}")
        if resume:
            core.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            history = json.loads(ckpt["history_json"])
            start_it = int(ckpt["iteration"])
            if ckpt.get("averaged") is not None:
                averaged = torch.optim.swa_utils.AveragedModel(core)
                averaged.load_state_dict(ckpt["averaged"])
            self.log(f"Resumed from {ckpt_path} at iteration {start_it}, after "
                     f"{(time.time() - clock_start) / 60:.1f} min of training")

        patch_zyx = list(reversed(self.plan_["patch_size"]))
        augment = build_augmentation(patch_zyx, n_classes, cfg, self.swap_values)
        augment.set_random_state(seed=cfg.seed + start_it)
        loss_fn = build_loss(cfg.loss, self.multilabel)
        rng = np.random.default_rng(cfg.seed + start_it)
        inferer_args = dict(roi_size=patch_zyx, sw_batch_size=4, overlap=0.5, mode="gaussian")

        def batch():
            images, labels = [], []
            for _ in range(cfg.batch_size):
                sample = augment(train_data[rng.integers(len(train_data))])[0]
                images.append(torch.as_tensor(sample["image"]))
                labels.append(torch.as_tensor(sample["label"]))
            return torch.stack(images).float(), torch.stack(labels).long()

        def target_for(labels):
            if not self.multilabel:
                return labels
            values = torch.tensor(self.label_values).view(1, -1, *([1] * (labels.dim() - 2)))
            return (labels == values).float()

        def validate(it: int) -> list[float]:
            """Dice per label on the validation cases, of the weights that would be exported now."""
            model = network if averaged is None else volume_network(averaged.module,
                                                                     net_spec["spatial_dims"])
            model.eval()
            scores = []
            with torch.inference_mode():
                for case in val_data:
                    x = torch.as_tensor(case["image"])[None].to(self.device)
                    with torch.autocast(self.device.type, enabled=use_cuda):
                        logits = sliding_window_inference(x, predictor=model, **inferer_args)
                    if self.multilabel:
                        probs = torch.sigmoid(logits[0].float()).cpu().numpy() > 0.5
                        pred = np.zeros(probs.shape[1:], np.uint8)
                        for c, v in enumerate(self.label_values):
                            pred[probs[c]] = v
                    else:
                        pred = logits[0].argmax(0).cpu().numpy()
                    scores.append(dice_per_label(pred, case["label"][0], self.label_values))
            network.train()
            per_label = np.nanmean(np.array(scores, dtype=float), axis=0).tolist()
            history["val_iteration"].append(it)
            history["val_dice"].append(per_label)
            names = " ".join(f"{self.label_names[v]}={d:.3f}" for v, d in zip(self.label_values,
                                                                             per_label))
            of = "" if averaged is None else f" of the average of {int(averaged.n_averaged)} snapshots"
            self.log(f"  validation{of} at {it}: mean Dice {np.mean(per_label):.3f} ({names})")
            return per_label

        def save_checkpoint(it: int) -> None:
            state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "iteration": it,
                     "plan_json": json.dumps(self.plan_), "history_json": json.dumps(history),
                     "averaged": None if averaged is None else averaged.state_dict(),
                     "elapsed_s": time.time() - clock_start}
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt_path)

        network.train()
        deadline = clock_start + budget_s if budget_s else math.inf
        tick, it = time.time(), start_it
        for it in range(start_it, cfg.iterations):
            images, labels = batch()
            images, labels = images.to(self.device), labels.to(self.device)
            if use_cuda and net_spec["spatial_dims"] == 3:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=use_cuda):
                loss = loss_fn(main_output(network(images)).float(), target_for(labels))
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if cfg.swa_start is not None and (it + 1) % cfg.swa_every == 0 and \
                    it + 1 > warmup and progress(it + 1) >= cfg.swa_start:
                if averaged is None:
                    averaged = torch.optim.swa_utils.AveragedModel(core)
                    self.log(f"Weight averaging starts at iteration {it + 1}, learning rate held at "
                             f"{scheduler.get_last_lr()[0]:.2e}")
                averaged.update_parameters(core)
            history["iteration"].append(it + 1)
            history["loss"].append(loss.item())
            if (it + 1) % 25 == 0:
                rate = 25 / (time.time() - tick)
                tick = time.time()
                eta = (cfg.iterations - it - 1) / max(rate, 1e-9)
                recent = float(np.mean(history["loss"][-25:]))
                self.log(f"iteration {it + 1}/{cfg.iterations}  loss {recent:.4f}  "
                         f"lr {scheduler.get_last_lr()[0]:.2e}  {rate:.2f} it/s  ETA {eta / 60:.1f} min")
            if (it + 1) % cfg.val_every == 0 or it + 1 == cfg.iterations:
                validate(it + 1)
                save_checkpoint(it + 1)
                plot_curves(history, cfg.output / "training_curve.png", self.label_names,
                            self.label_values)
            if time.time() > deadline:
                self.log(f"Time limit of {cfg.time_limit_min} min reached at iteration {it + 1}.")
                if not history["val_iteration"] or history["val_iteration"][-1] != it + 1:
                    validate(it + 1)
                    save_checkpoint(it + 1)
                break
        plot_curves(history, cfg.output / "training_curve.png", self.label_names, self.label_values)
        train_time = time.time() - clock_start
        swa = None
        if averaged is not None:
            swa = {"start": cfg.swa_start, "every": cfg.swa_every,
                   "snapshots": int(averaged.n_averaged)}
            core = averaged.module
        return self.export(core, history, train_time, it + 1, swa)

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
        last = history["val_dice"][-1] if history["val_dice"] else []
        val_metrics = {self.label_names[v]: round(d, 4) for v, d in zip(self.label_values, last)}
        plan = self.plan_
        meta = {
            "schema_version": 1,
            "id": cfg.model_id,
            "version": "1.0.0",
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
            },
        }
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
