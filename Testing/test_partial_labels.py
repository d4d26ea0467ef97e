"""Partially contoured training data: the marginal loss, class-balanced sampling, the mirror's
labelled-organ swap, and a short real training run on partially contoured cases."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import data_path
from unetseg_engine.modelpkg import load_package
from unetseg_engine.train.dataset import load_dataset
from unetseg_engine.train.losses import MarginalDiceCELoss
from unetseg_engine.train.sampling import BalancedSampler, crop
from unetseg_engine.train.trainer import TrainConfig, Trainer, cpu_has_bf16, mirror_transform


def _logits_and_labels(seed=0, batch=2, classes=5, shape=(6, 7, 8)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *shape, generator=gen)
    labels = torch.randint(0, classes, (batch, 1, *shape), generator=gen)
    return logits, labels


def test_marginal_loss_equals_monai_dice_ce_on_fully_contoured_cases():
    from monai.losses import DiceCELoss

    monai_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    for seed in range(3):
        logits, labels = _logits_and_labels(seed)
        everything = torch.ones(2, 5, dtype=torch.bool)
        expected = monai_loss(logits, labels)
        assert torch.allclose(MarginalDiceCELoss()(logits, labels), expected, atol=1e-6)
        assert torch.allclose(MarginalDiceCELoss()(logits, labels, everything), expected, atol=1e-6)


def test_marginal_loss_ignores_an_uncontoured_organs_prediction():
    logits, labels = _logits_and_labels(1)
    labels[0][labels[0] == 2] = 0  # organ 2 not contoured in sample 0: its voxels read 0
    labelled = torch.ones(2, 5, dtype=torch.bool)
    labelled[0, 2] = False
    # sample 0 now predicts organ 2 wherever its map says background (swap the two logits there)
    swapped = logits.clone()
    where = labels[0, 0] == 0
    swapped[0, 0][where], swapped[0, 2][where] = logits[0, 2][where], logits[0, 0][where]
    loss = MarginalDiceCELoss()
    assert torch.allclose(loss(logits, labels, labelled), loss(swapped, labels, labelled), atol=1e-6)
    # read as background, the same change is punished: the ordinary loss is not indifferent to it
    assert not torch.allclose(loss(logits, labels), loss(swapped, labels), atol=1e-3)
    # and the organ still counts where it was contoured (sample 1)
    swapped[1, 2] += 5.0
    assert not torch.allclose(loss(logits, labels, labelled), loss(swapped, labels, labelled), atol=1e-3)


def test_marginal_loss_has_finite_gradients():
    logits, labels = _logits_and_labels(2)
    logits.requires_grad_(True)
    labelled = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    labels[0][(labels[0] == 2) | (labels[0] == 3)] = 0
    labels[1][labels[1] > 0] = 0
    MarginalDiceCELoss()(logits, labels, labelled).backward()
    assert torch.isfinite(logits.grad).all()
    # sample 1 contoured nothing but background: its only term is the cross-entropy of the merged
    # class, which is every class, so it teaches nothing
    assert float(logits.grad[1].abs().max()) < 1e-6


def test_balanced_sampler_draws_each_organ_from_the_cases_that_contoured_it():
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        label = np.zeros((1, 20, 20, 20), np.uint8)
        label[0, 2:6, 2:6, 2:6] = 1  # organ 1 in every case
        if i == 2:
            label[0, 14:16, 14:16, 14:16] = 2  # organ 2, small, in one case only
        cases.append({"image": rng.normal(size=(1, 20, 20, 20)).astype(np.float32), "label": label,
                      "name": f"c{i}", "labelled": np.array([True, True, i == 2])})
    sampler = BalancedSampler(cases, [1, 2], [8, 8, 8], np.random.default_rng(1))
    counts = {"organ2": 0, "n": 600}
    for _ in range(counts["n"]):
        sample = sampler.sample()
        assert sample["image"].shape == (1, 8, 8, 8) and sample["label"].shape == (1, 8, 8, 8)
        if (sample["label"] == 2).any():
            counts["organ2"] += 1
            assert sample["name"] == "c2"
    # 8 of 8000 voxels, in one case of three: a third of the patches, not 1 in 3000
    assert 0.25 < counts["organ2"] / counts["n"] < 0.42


def test_crop_pads_a_volume_smaller_than_the_patch():
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    label = np.ones((1, 4, 5, 6), np.uint8)
    patch_image, patch_label = crop(image, label, np.array([1, 1, 1]), np.array([8, 5, 4]))
    assert patch_image.shape == (1, 8, 5, 4) and patch_label.shape == (1, 8, 5, 4)
    assert patch_label.sum() == 4 * 5 * 4  # all of z kept, padded with background
    assert patch_image.min() == image.min()


def test_mirror_swaps_the_labelled_organs_with_their_labels():
    transform = mirror_transform({3: 4, 4: 3}, prob=1.0)
    label = np.zeros((1, 2, 2, 4), np.uint8)
    label[..., 0] = 3  # a right parotid on the left edge of the array
    labelled = np.array([True, True, True, True, False])  # right contoured, left not
    out = transform({"image": np.zeros((1, 2, 2, 4), np.float32), "label": label,
                     "labelled": labelled})
    assert (out["label"][..., -1] == 4).all()
    assert out["labelled"].tolist() == [True, True, True, False, True]


def test_partial_labels_are_read_from_dataset_json(tmp_path):
    root = data_path("openkbp_hn_oar_partial")
    dataset = load_dataset(root)
    table = json.loads((root / "labelled_classes.json").read_text())
    case = next(c for c in dataset.cases if len(table[c.name]) < 7)
    assert case.labelled == sorted(table[case.name])
    assert case.is_partial(list(range(1, 8)))
    full = load_dataset(data_path("openkbp_hn_oar"))
    assert all(c.labelled is None and not c.is_partial(list(range(1, 8))) for c in full.cases)


@pytest.mark.slow
def test_training_on_real_partial_cases_gives_a_valid_package(tmp_path):
    """Three real partially contoured patients next to the fully contoured dataset, a few steps."""
    source = data_path("openkbp_hn_oar_partial")
    table = json.loads((source / "labelled_classes.json").read_text())
    names = [n for n in sorted(table) if len(table[n]) < 7][:4]
    extra = tmp_path / "partial"
    (extra / "imagesTr").mkdir(parents=True)
    (extra / "labelsTr").mkdir()
    for name in names:
        (extra / "imagesTr" / f"{name}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{name}_0000.nii.gz")
        (extra / "labelsTr" / f"{name}.nii.gz").symlink_to(source / "labelsTr" / f"{name}.nii.gz")
    meta = json.loads((source / "dataset.json").read_text())
    (extra / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(names)}))
    (extra / "labelled_classes.json").write_text(json.dumps({n: table[n] for n in names}))
    cfg = TrainConfig(dataset=data_path("openkbp_hn_oar"), output=tmp_path / "run", model_id="tiny-partial",
                      extra_datasets=[str(extra)], val_fraction=0.25, iterations=6, val_every=6,
                      batch_size=2, spacing=[8.0, 8.0, 5.0], patch_size=[32, 32, 32], base_features=4,
                      window=(250, 1500), num_threads=2, sampling="balanced",
                      mirror_pairs=[["RightParotid", "LeftParotid"]])
    package = load_package(Trainer(cfg).run())
    training = package.meta["training"]
    assert package.load_state_dict()  # checksum verified
    assert training["partially_contoured_train_cases"] == 3
    assert training["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    by_dataset = training["validation_dice_model_grid_by_dataset"]
    assert set(by_dataset) == {"openkbp_hn_oar", "partial"}
    held_out = [n for n in names if n in training["validation_cases"]]
    assert len(held_out) == 1
    missing = {v for v in range(1, 8)} - set(table[held_out[0]])
    names_by_value = {label["value"]: label["name"] for label in package.labels}
    # an organ the held-out partial case did not contour has no score, the others have one
    for value, name in names_by_value.items():
        score = by_dataset["partial"][name]
        assert (score is None) == (value in missing), (name, score)
    assert all(not math.isnan(d) for d in by_dataset["openkbp_hn_oar"].values())
