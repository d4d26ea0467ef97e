"""The trainer's pieces on a tiny synthetic dataset (written in the test, so these run without the
shared data): planning before any run, one step that lowers the loss, a resume that continues the
iteration count and the random streams exactly, and a time limit on a clock the test controls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from unetseg_engine.modelpkg import load_package
from unetseg_engine.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four cases of 24x32x32 voxels at 2 mm: a bright block (label 1) and a brighter one (2) in noise."""
    root = tmp_path_factory.mktemp("synthetic-dataset")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for case in range(4):
        label = np.zeros((24, 32, 32), np.uint8)
        z, y, x = rng.integers(2, 10, 3)
        label[z:z + 8, y:y + 10, x:x + 10] = 1
        z, y, x = rng.integers(12, 16, 3)
        label[z:z + 6, y:y + 8, x + 4:x + 12] = 2
        ct = rng.normal(0, 40, label.shape) + np.choose(label, [0.0, 150.0, 350.0])
        for array, folder, name in ((ct.astype(np.int16), "imagesTr", f"case{case}_0000"),
                                    (label, "labelsTr", f"case{case}")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            sitk.WriteImage(image, str(root / folder / f"{name}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "synthetic", "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 4,
        "labels": {"background": 0, "Bright": 1, "Brighter": 2}}))
    return root


def config(dataset, output, **changes) -> TrainConfig:
    settings = dict(dataset=dataset, output=output, model_id="tiny-synthetic", iterations=6, val_every=3,
                    batch_size=2, spacing=[4.0, 4.0, 4.0], patch_size=[16, 16, 16], base_features=4,
                    window=(100.0, 600.0), num_threads=1, device="cpu", val_fraction=0.25)
    return TrainConfig(**{**settings, **changes})


def history(output) -> dict:
    import torch

    return json.loads(torch.load(output / "checkpoint.pt", weights_only=True)["history_json"])


def test_plan_works_without_run_and_follows_the_data(dataset, tmp_path):
    trainer = Trainer(config(dataset, tmp_path / "run", spacing=None, patch_size=None))
    plan = trainer.plan()  # run() never called: the device comes from the constructor
    assert trainer.device.type == "cpu"
    assert plan["fingerprint"]["spacing_median"] == [2.0, 2.0, 2.0]
    assert plan["preprocessing"]["spacing_mm"] == [2.0, 2.0, 2.0]  # the data's own, none given
    assert plan["preprocessing"]["normalization"] == {"method": "ct_window", "level": 100.0, "width": 600.0}
    assert all(p % 16 == 0 for p in plan["patch_size"]) and plan["modality"] == "CT"
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_one_step_lowers_the_loss_on_its_batch(dataset, tmp_path):
    import torch

    trainer = Trainer(config(dataset, tmp_path, learning_rate=1e-2, iterations=40))
    state = trainer.setup()
    batch = trainer.batch(state)
    with torch.no_grad():
        before = float(trainer.compute_loss(state, *batch))
    step_loss = trainer.train_step(state, batch)
    with torch.no_grad():
        after = float(trainer.compute_loss(state, *batch))
    assert state.iteration == 1
    assert step_loss == pytest.approx(before, rel=1e-5)  # the step's loss is the loss before it
    assert after < before - 1e-3, (before, after)


def test_resume_continues_the_iteration_count_and_the_random_streams(dataset, tmp_path):
    """Three steps, a checkpoint, a new process's worth of Trainer resuming to six: the same losses,
    Dice and weights as six steps in one go. Nothing here depends on the machine's speed."""
    import torch

    straight = tmp_path / "straight"
    Trainer(config(dataset, straight)).run()

    cut = tmp_path / "cut"
    first = Trainer(config(dataset, cut))
    state = first.setup()
    for _ in range(3):
        first.after_step(state, first.train_step(state))
    first.validate(state)
    first.save_checkpoint(state)
    assert history(cut)["iteration"] == [1, 2, 3]
    package = Trainer(config(dataset, cut, resume=True)).run()

    resumed, expected = history(cut), history(straight)
    assert resumed["iteration"] == [1, 2, 3, 4, 5, 6]  # nothing repeated or lost
    assert resumed["loss"] == expected["loss"]  # the same patches, drawn from the same streams
    assert resumed["val_dice"] == expected["val_dice"]
    a = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert load_package(package).meta["training"]["iterations"] == 6


def test_a_resumed_run_keeps_the_time_already_spent_against_the_time_limit(dataset, tmp_path):
    """On a clock that moves 10 s per step, a 30 s limit stops the run after 4 steps (40 s > 30 s),
    and a resumed run has 30 - 40 s left: one step, then it stops."""
    now = [0.0]

    def tick(fraction: float) -> None:  # called once per step
        now[0] += 10.0

    cfg = config(dataset, tmp_path, iterations=10_000, val_every=10_000, time_limit_min=0.5)
    package = load_package(Trainer(cfg, progress=tick, clock=lambda: now[0]).run())
    assert history(tmp_path)["iteration"] == [1, 2, 3, 4]
    assert package.meta["training"]["time_s"] == 40.0

    now[0] = 1000.0  # later, in another session: only the time spent in training counts
    Trainer(config(dataset, tmp_path, iterations=10_000, val_every=10_000, time_limit_min=0.5,
                   resume=True), progress=tick, clock=lambda: now[0]).run()
    assert history(tmp_path)["iteration"] == [1, 2, 3, 4, 5]
