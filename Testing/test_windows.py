"""The network-running half of inference (``windows.NetworkRunner``) on its own, on a tiny real model
and made-up model-grid arrays (no scan, no shared data): windows, flips, left/right swaps, settings,
cancel and progress; and ``Predictor.with_settings``, which shares the loaded networks."""

import numpy as np
import pytest

from helpers import make_package, synthetic_ct, tiny_meta
from unetseg_engine.errors import CancelledError, UNetSegError
from unetseg_engine.inference import Predictor, RunSettings
from unetseg_engine.windows import NetworkRunner, WindowSettings, count_windows

torch = pytest.importorskip("torch")


def noise(shape_zyx, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, *shape_zyx)).astype(np.float32)


def network_of(package):
    """The package's network built afresh from its weights file (not the runner's own object)."""
    from unetseg_engine.networks import build_network

    desc = package.desc
    net = build_network(desc.network.architecture, desc.network.spatial_dims, desc.n_inputs,
                        desc.out_channels, desc.network.params)
    net.load_state_dict(package.load_state_dict())
    return net.eval()


@pytest.fixture(scope="module")
def mirrored_package(tmp_path_factory):
    """Flips allowed along x and z; Structure1 and Structure2 a left/right pair."""
    meta = tiny_meta("tiny-mirrored")
    meta["inference"].update(tta_flip_axes=["x", "z"], tta_mirror_pairs=[["Structure1", "Structure2"]])
    return make_package(tmp_path_factory.mktemp("models") / "mirrored", meta, seed=4)


def test_one_window_is_the_networks_softmax(tiny_package):
    runner = NetworkRunner(tiny_package, "cpu", "torch")
    array = noise(tiny_package.desc.window_zyx)  # exactly one window: no blending to speak of
    probs, device = runner.probabilities(array)
    with torch.inference_mode():
        expected = torch.softmax(network_of(tiny_package)(torch.from_numpy(array)[None]), 1)[0].numpy()
    assert device == "cpu" and probs.dtype == np.float32 and probs.shape == expected.shape
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_tta_is_the_mean_over_flips_with_left_and_right_swapped(mirrored_package):
    shape = (30, 50, 45)  # several overlapping windows
    array = noise(shape, seed=1)
    plain = NetworkRunner(mirrored_package, "cpu", "torch")
    tta = plain.with_settings(WindowSettings(tta=True))
    assert tta.networks is plain.networks  # shared, not loaded again
    assert tta.tta_flips() == [(), (4,), (2,)] and tta.mirror_channels() == [0, 2, 1, 3]

    def flipped(axis):  # zyx array axis of the model's x or z
        probs, _ = plain.probabilities(np.ascontiguousarray(np.flip(array, axis)))
        return np.flip(probs, axis)

    along_x = flipped(3)[[0, 2, 1, 3]]  # the mirrored pass reports each organ as its twin
    expected = (plain.probabilities(array)[0] + along_x + flipped(1)) / 3
    np.testing.assert_allclose(tta.probabilities(array)[0], expected, atol=1e-5)
    # without the swap the answer differs: the check above can see a missing swap
    assert np.abs((plain.probabilities(array)[0] + flipped(3) + flipped(1)) / 3 - expected).max() > 1e-3


def test_run_settings_override_the_models_own(tiny_package):
    runner = NetworkRunner(tiny_package, "cpu", "torch")
    own = runner.windows_args()
    assert own == {"roi_size": [16, 32, 32], "overlap": 0.25, "sw_batch_size": 2, "mode": "gaussian"}
    other = runner.with_settings(WindowSettings(overlap=0.6, sw_batch_size=3)).windows_args()
    assert other["overlap"] == 0.6 and other["sw_batch_size"] == 3 and runner.windows_args() == own


def test_progress_counts_every_batch_and_cancel_stops_between_batches(tiny_package):
    runner = NetworkRunner(tiny_package, "cpu", "torch", WindowSettings(sw_batch_size=1))
    shape = (40, 70, 70)
    n_windows = count_windows(shape, [16, 32, 32], 0.25)
    assert n_windows == 3 * 3 * 3
    events = []
    runner.probabilities(noise(shape), lambda stage, f: events.append((stage, f)))
    fractions = [f for s, f in events if s == "inference"]
    assert len(fractions) == n_windows and fractions == sorted(fractions) and fractions[-1] == 1.0
    asked = []
    with pytest.raises(CancelledError):
        runner.probabilities(noise(shape), is_cancelled=lambda: asked.append(1) or len(asked) > 3)
    assert len(asked) == 4  # stopped at the fourth batch, not at the end


@pytest.mark.parametrize("bad", [{"overlap": 0.99}, {"overlap": float("nan")}, {"sw_batch_size": 0}])
def test_settings_are_checked_however_they_are_changed(tiny_package, bad):
    with pytest.raises(UNetSegError):
        WindowSettings(**bad)
    with pytest.raises(UNetSegError):
        RunSettings(**bad)
    predictor = Predictor(device="cpu")
    predictor.load(tiny_package)
    with pytest.raises(UNetSegError):
        predictor.with_settings(**bad)
    name, value = next(iter(bad.items()))
    with pytest.raises(UNetSegError):  # the worker's old way, assigning an attribute, is checked too
        setattr(predictor, name, value)
    assert predictor.settings == RunSettings()  # unchanged


def test_with_settings_shares_the_networks_and_leaves_the_original_alone(tiny_package):
    ct = synthetic_ct()
    base = Predictor(device="cpu")
    base.load(tiny_package)
    changed = base.with_settings(overlap=0.6, tta=True, postprocess=False, uncertainty=True)
    assert changed.networks is base.networks and changed.has_loaded(tiny_package)
    assert base.settings == RunSettings() and base.network.settings == WindowSettings()
    assert changed.network.settings == WindowSettings(overlap=0.6, tta=True)
    fresh = Predictor(device="cpu", overlap=0.6, tta=True, postprocess=False, uncertainty=True)
    fresh.load(tiny_package)
    got, want = changed.predict([ct]), fresh.predict([ct])
    import SimpleITK as sitk

    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got.label_map),
                                  sitk.GetArrayViewFromImage(want.label_map))
    assert got.uncertainty is not None and base.predict([ct]).uncertainty is None
