"""Output grid equals input grid, for NIfTI, a DICOM series and re-gridded variants of a scan; and
results follow the anatomy, not the array axes (a flipped copy gives the same labels).

The scans are synthetic (``helpers.synthetic_ct``: asymmetric, oblique, a flipped axis, anisotropic
spacing), so these run without the shared data: they check geometry, not anatomy."""

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import OBLIQUE, OBLIQUE_FLIPPED, synthetic_ct, synthetic_ct_file, write_ct_series
from unetseg_engine.cli import main
from unetseg_engine.imageio import read_image
from unetseg_engine.inference import Predictor


def same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)  # DICOM DS rounding
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def flipped_copy(image: sitk.Image, axis_ijk: int) -> sitk.Image:
    """The same physical image with its voxels stored in reverse order along one axis."""
    flipped = sitk.Flip(image, [axis_ijk == 0, axis_ijk == 1, axis_ijk == 2], flipAboutOrigin=False)
    return flipped


def oblique_copy(image: sitk.Image, degrees: float = 20.0, size=(110, 110, 100),
                 spacing=(4.0, 4.5, 3.0)) -> sitk.Image:
    """Resample the scan onto a grid rotated about z and with other spacing (an oblique scan)."""
    angle = np.deg2rad(degrees)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rot @ np.array(image.GetDirection()).reshape(3, 3)
    ref = sitk.Image(list(size), image.GetPixelID())
    ref.SetSpacing(list(spacing))
    ref.SetDirection(direction.ravel().tolist())
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    half = direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    ref.SetOrigin((np.array(centre) - half).tolist())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024.0)


@pytest.fixture(scope="module")
def ct():
    """Oblique, with a flipped axis (determinant -1) and anisotropic spacing."""
    return synthetic_ct(direction=OBLIQUE_FLIPPED)


@pytest.fixture(scope="module")
def predictor(tiny_package):
    p = Predictor(device="cpu")
    p.load(tiny_package)
    return p


@pytest.mark.parametrize("variant", ["as_is", "flipped_k", "flipped_i", "oblique"])
def test_label_map_is_on_exactly_the_input_grid(ct, predictor, variant):
    image = {"as_is": lambda: ct, "flipped_k": lambda: flipped_copy(ct, 2),
             "flipped_i": lambda: flipped_copy(ct, 0),
             "oblique": lambda: oblique_copy(ct, size=(60, 60, 50), spacing=(2.5, 3.0, 2.0))}[variant]()
    result = predictor.predict([image])
    same_grid(result.label_map, image)
    assert result.label_map.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayViewFromImage(result.label_map).any()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_flipped_copy_gets_the_same_labels_in_patient_space(ct, predictor, axis):
    original = predictor.predict([ct]).label_map
    flipped = predictor.predict([flipped_copy(ct, axis)]).label_map
    back = sitk.Resample(flipped, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a, b = sitk.GetArrayViewFromImage(original), sitk.GetArrayViewFromImage(back)
    assert (a == b).mean() > 0.999


def test_input_volume_is_never_modified(ct, predictor):
    before = sitk.GetArrayFromImage(ct).copy()
    predictor.predict([ct], window=(-600, 1500))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ct), before)


@pytest.mark.parametrize("direction", ["identity", "oblique"])
def test_dicom_series_folder_round_trip(direction, tmp_path, tiny_package):
    """A CT series written slice by slice (pydicom) is read on the grid it was written from, and the
    labels come back on it."""
    source = synthetic_ct(shape_kji=(20, 48, 40), spacing=(0.8, 0.9, 2.0),
                          direction=np.eye(3) if direction == "identity" else OBLIQUE)
    folder = tmp_path / "dicom"
    write_ct_series(source, folder)
    image = read_image(folder)
    same_grid(image, source)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(source))
    out = tmp_path / "dicom_labels.nrrd"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(tiny_package.path), "-q"]) == 0
    same_grid(sitk.ReadImage(str(out)), source)


def test_nifti_to_seg_nrrd_keeps_geometry_and_names(tmp_path, tiny_package):
    import slicerio

    ct_path = synthetic_ct_file(tmp_path, direction=OBLIQUE_FLIPPED)
    out = tmp_path / "case.seg.nrrd"
    assert main(["segment", str(ct_path), "-o", str(out), "--model", str(tiny_package.path), "-q"]) == 0
    seg = slicerio.read_segmentation(str(out))
    image = sitk.ReadImage(str(ct_path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(np.array(seg["ijkToLPS"])[:3, :3], direction * image.GetSpacing(),
                               atol=1e-5)
    np.testing.assert_allclose(np.array(seg["ijkToLPS"])[:3, 3], image.GetOrigin(), atol=1e-4)
    assert seg["voxels"].shape == image.GetSize()
    assert [s["name"] for s in seg["segments"]] == tiny_package.label_names
    assert seg["segments"][0]["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    np.testing.assert_allclose(seg["segments"][1]["color"],
                               np.array(tiny_package.labels[1]["color"]) / 255, atol=1e-4)
