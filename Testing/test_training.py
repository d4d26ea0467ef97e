"""Training on real data: a tiny network for a few steps; the loss falls and a valid package comes out
that the engine can load and run."""

import json

import numpy as np
import pytest

from helpers import data_path
from unetseg_engine.modelpkg import load_package
from unetseg_engine.train.planner import plan_experiment
from unetseg_engine.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dataset = data_path("openkbp_hn_oar")
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(dataset=dataset, output=out, model_id="tiny-trained", iterations=40,
                      val_every=40, batch_size=2, learning_rate=3e-3, spacing=[8.0, 8.0, 5.0],
                      patch_size=[32, 32, 32], base_features=4, window=(250, 1500), num_threads=2,
                      label_info={"Mandible": {"color": [241, 214, 145]}},
                      mirror_pairs=[["RightParotid", "LeftParotid"]])
    package = Trainer(cfg).run()
    return out, package


@pytest.mark.slow
def test_loss_falls_and_a_valid_package_comes_out(trained):
    out, package_dir = trained
    package = load_package(package_dir)
    assert package.id == "tiny-trained"
    assert package.label_names == ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid",
                                   "Esophagus", "Larynx", "Mandible"]
    assert package.labels[-1]["color"] == [241, 214, 145]
    assert package.meta["preprocessing"]["normalization"] == {"method": "ct_window", "level": 250.0,
                                                              "width": 1500.0}
    ckpt_history = json.loads((out / "plan.json").read_text())
    assert ckpt_history["patch_size"] == [32, 32, 32]
    assert (out / "training_curve.png").stat().st_size > 1000
    assert package.load_state_dict()  # checksum verified
    # trained with the left-right mirror, so its test-time augmentation may mirror too
    assert package.meta["inference"]["tta_flip_axes"] == ["x"]
    assert package.meta["inference"]["tta_mirror_pairs"] == [["RightParotid", "LeftParotid"]]


@pytest.mark.slow
def test_training_loss_decreases(trained):
    import torch

    out, _ = trained
    history = json.loads(torch.load(out / "checkpoint.pt", weights_only=True)["history_json"])
    loss = np.array(history["loss"])
    assert loss[-10:].mean() < 0.9 * loss[:10].mean()


def test_planner_follows_nnunet_rules_for_anisotropic_data():
    fp = {"spacing_median": [0.8, 0.8, 5.0], "spacing_p10": [0.7, 0.7, 3.0],
          "extent_mm_median": [300.0, 300.0, 200.0],
          "foreground_intensity": {"p00_5": -100.0, "p99_5": 300.0}}
    plan = plan_experiment(fp, "CT")
    assert plan["preprocessing"]["spacing_mm"] == [0.8, 0.8, 3.0]  # 10th percentile on the coarse axis
    assert np.prod(plan["patch_size"]) <= 96 * 96 * 64
    assert all(p % 16 == 0 for p in plan["patch_size"])
    assert plan["preprocessing"]["normalization"] == {"method": "ct_window", "level": 100.0,
                                                      "width": 400.0}
    mr = plan_experiment(fp, "MR", architecture="DynUNet", spatial_dims=2)
    assert mr["preprocessing"]["normalization"] == {"method": "zscore"}
    assert mr["patch_size"][2] == 1 and mr["network"]["architecture"] == "DynUNet"


@pytest.mark.parametrize("architecture", ["UNet", "BasicUNet", "BasicUNetPlusPlus", "AttentionUnet",
                                          "VNet", "DynUNet", "SegResNet"])
def test_every_architecture_builds_and_runs_a_patch(architecture):
    import torch

    from unetseg_engine.networks import build_network, main_output

    fp = {"spacing_median": [1.0, 1.0, 1.0], "spacing_p10": [1.0, 1.0, 1.0],
          "extent_mm_median": [32.0, 32.0, 32.0], "foreground_intensity": {"p00_5": 0, "p99_5": 1}}
    plan = plan_experiment(fp, "CT", architecture=architecture, base_features=8)
    net = plan["network"]
    model = build_network(net["architecture"], 3, 1, 3, net["params"]).eval()
    with torch.inference_mode():
        out = main_output(model(torch.zeros(1, 1, 32, 32, 32)))
    assert out.shape == (1, 3, 32, 32, 32)


# Resuming (iteration count, random streams, the time limit) is tested without the data and without
# depending on speed in test_trainer_pieces.py.


@pytest.mark.slow
def test_init_from_a_package_starts_from_its_weights_and_plan(trained, tmp_path):
    import torch

    out, package_dir = trained
    cfg = TrainConfig(dataset=data_path("openkbp_hn_oar"), output=tmp_path, model_id="tiny-continued",
                      iterations=5, val_every=5, batch_size=2, num_threads=2,
                      init_from=str(package_dir), patch_size=[48, 32, 32])
    continued = load_package(Trainer(cfg).run())
    original = load_package(package_dir)
    assert continued.meta["preprocessing"] == original.meta["preprocessing"]
    assert continued.meta["network"] == original.meta["network"]
    assert continued.meta["inference"]["patch_size"] == [48, 32, 32]
    assert continued.meta["training"]["init_from"] == {
        "id": "tiny-trained", "version": "1.0.0", "sha256": original.meta["weights"]["sha256"]}
    first = json.loads(torch.load(out / "checkpoint.pt", weights_only=True)["history_json"])["loss"]
    again = json.loads(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history_json"])["loss"]
    assert np.mean(again[:5]) < 0.9 * np.mean(first[:5])  # not a fresh network


def test_mirror_augmentation_swaps_paired_labels_on_a_real_case():
    """Mirrored left-right, the right parotid must still be labelled right and lie on the patient's
    right (low x on the LPS model grid), with the left parotid's former voxels."""
    from unetseg_engine.train.dataset import load_dataset, prepare_case
    from unetseg_engine.train.trainer import mirror_transform

    dataset = load_dataset(data_path("openkbp_hn_oar"))
    case = next(c for c in dataset.cases if c.name == "pt_201")
    image, label = prepare_case(case, {"spacing_mm": [4.688, 4.688, 2.5],
                                       "normalization": {"method": "ct_window", "level": 250,
                                                         "width": 1500},
                                       "foreground_crop": {"enabled": True, "threshold": -500.0}})
    right, left = dataset.labels["RightParotid"], dataset.labels["LeftParotid"]
    mirror = mirror_transform({right: left, left: right}, prob=1.0)
    out = mirror({"image": image, "label": label[None]})
    mirrored = out["label"][0]

    def centre_x(mask):
        return np.nonzero(mask)[2].mean()

    assert centre_x(label == right) < centre_x(label == left)
    assert centre_x(mirrored == right) < centre_x(mirrored == left)
    assert (mirrored == right).sum() == (label == left).sum()
    assert np.array_equal(mirrored == right, (label == left)[..., ::-1])
    brainstem = dataset.labels["Brainstem"]
    assert np.array_equal(mirrored == brainstem, (label == brainstem)[..., ::-1])
    assert np.array_equal(out["image"], image[..., ::-1])


def test_mirror_pairs_must_name_two_dataset_labels(tmp_path):
    from unetseg_engine.errors import UNetSegError

    for pairs in ([["RightParotid", "LeftKidney"]], [["RightParotid"]]):
        cfg = TrainConfig(dataset=data_path("openkbp_hn_oar"), output=tmp_path, model_id="x",
                          mirror_pairs=pairs)
        with pytest.raises(UNetSegError, match="Mirror pair"):
            Trainer(cfg)
    cfg = TrainConfig(dataset=data_path("openkbp_hn_oar"), output=tmp_path, model_id="x",
                      mirror_pairs=[["RightParotid", "LeftParotid"]], flip_axes=["x"])
    with pytest.raises(UNetSegError, match="either --flip-axes x or --mirror-pairs"):
        Trainer(cfg)


@pytest.mark.slow
def test_weight_averaging_exports_the_average_of_the_snapshots(trained, tmp_path):
    """--swa-start: the exported weights are the mean of the snapshots taken after the start, and
    the learning rate is held from there on."""
    import torch

    _, package_dir = trained
    cfg = TrainConfig(dataset=data_path("openkbp_hn_oar"), output=tmp_path, model_id="tiny-swa",
                      iterations=12, val_every=12, batch_size=1, num_threads=2,
                      init_from=str(package_dir), swa_start=0.5, swa_every=2)
    trainer = Trainer(cfg)
    snapshots = []
    original_step = torch.optim.AdamW.step

    def step_and_snapshot(optimizer, *args, **kwargs):
        result = original_step(optimizer, *args, **kwargs)
        snapshots.append([p.detach().clone() for group in optimizer.param_groups
                          for p in group["params"]])
        return result

    torch.optim.AdamW.step = step_and_snapshot
    try:
        package = load_package(trainer.run())
    finally:
        torch.optim.AdamW.step = original_step
    swa = package.meta["training"]["weight_averaging"]
    # warm-up is 1 iteration, so progress after iteration i is (i - 1) / 11: >= 0.5 from i = 7;
    # snapshots every 2 iterations from there: 8, 10, 12
    assert swa == {"start": 0.5, "every": 2, "snapshots": 3}
    expected = [torch.stack([snapshots[i - 1][k] for i in (8, 10, 12)]).mean(0)
                for k in range(len(snapshots[0]))]
    # the optimizer holds the network's parameters in named_parameters() order
    names = [name for name, _ in core_named_parameters(package)]
    assert len(names) == len(expected)
    state = package.load_state_dict()
    for name, mean in zip(names, expected):
        torch.testing.assert_close(state[name], mean)
    # ... which is the average, not the last snapshot
    assert any(not torch.equal(mean, last) for mean, last in zip(expected, snapshots[-1]))
    history = json.loads(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history_json"])
    assert len(history["loss"]) == 12


def core_named_parameters(package):
    from unetseg_engine.networks import build_network

    net = package.meta["network"]
    core = build_network(net["architecture"], net["spatial_dims"], 1, len(package.label_names) + 1,
                         net["params"])
    return list(core.named_parameters())


def test_weight_averaging_start_must_be_a_fraction(tmp_path):
    from unetseg_engine.errors import UNetSegError

    cfg = TrainConfig(dataset=data_path("openkbp_hn_oar"), output=tmp_path, model_id="x", swa_start=1.5)
    with pytest.raises(UNetSegError, match="fraction of the run"):
        Trainer(cfg)
