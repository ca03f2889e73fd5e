"""The deep3d extractor on real Yale photos with a checkpoint saved from our own R-Net (we have no
published weights): real dlib boxes and landmarks, real alignment, real ResNet-50 forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facedist import assets
from facedist.align import align_face
from facedist.detection import FaceBox
from facedist.extractors.deep3d import Deep3DExtractor, deep3d_angles_to_degrees, deep3d_rotation
from facedist.models.resnet import ReconNet, split_coefficients
from facedist.schema import STATUS_ERROR, STATUS_NO_FACE, STATUS_OK, layout_from_schema, rows_to_table

YALE_SAMPLES = ("subject01.normal", "subject02.happy", "subject05.surprised", "subject13.leftlight")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """{'net_recon': state_dict} of an R-Net whose heads are random (upstream starts them at zero,
    which would make every output 0 and hide ordering mistakes)."""
    torch.manual_seed(3)
    net = ReconNet()
    with torch.no_grad():
        for layer in net.final_layers:
            layer.weight.normal_(0, 0.01)
            layer.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("deep3d") / "epoch_20.pth"
    torch.save({"net_recon": net.state_dict(), "epoch": 20}, path)
    return path


@pytest.fixture(scope="module")
def extractor(checkpoint):
    return Deep3DExtractor(detector="dlib", checkpoint=str(checkpoint), batch_size=4)


@pytest.fixture(scope="module")
def yale_images(yale_dir):
    return [np.asarray(Image.open(yale_dir / name).convert("RGB")) for name in YALE_SAMPLES]


@pytest.fixture(scope="module")
def yale_results(extractor, yale_images):
    return extractor.extract(yale_images)


def test_missing_checkpoint_is_a_clear_error_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.MODEL_DIR_ENV, str(tmp_path / "models"))
    monkeypatch.setenv(assets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(assets.ModelNotFoundError, match="deep3d/epoch_20.pth"):
        Deep3DExtractor()


def test_layout(extractor, checkpoint):
    layout = extractor.layout
    assert (layout.backend, layout.n_id, layout.n_exp, layout.n_tex, layout.n_light, layout.n_feature) == \
        ("deep3d", 80, 64, 80, 27, 2048)
    assert layout.model_version == assets.sha256_of(checkpoint)[:16]
    assert layout.detector.startswith("hog:dlib-") and layout.detector == extractor.detector.version
    assert "shape_predictor_68_face_landmarks" in layout.landmark_source


def test_real_faces_give_ok_results_with_deep3d_sizes(yale_results, yale_images):
    assert len(yale_results) == len(yale_images)
    for result, image in zip(yale_results, yale_images):
        assert result.status == STATUS_OK, result.message
        assert (result.width, result.height) == (image.shape[1], image.shape[0])
        assert result.num_faces >= 1 and result.landmarks.shape == (68, 2)
        sizes = [a.shape for a in (result.id_coeffs, result.exp_coeffs, result.tex_coeffs,
                                   result.light_coeffs, result.translation, result.feature)]
        assert sizes == [(80,), (64,), (80,), (27,), (3,), (2048,)]
        assert all(np.isfinite(v) for v in (result.yaw, result.pitch, result.roll))
        # the face is inside the photo and the landmarks inside the box's neighbourhood
        x0, y0, x1, y1 = result.box
        assert 0 <= result.landmarks[:, 0].mean() - x0 <= x1 - x0
        assert 0 <= result.landmarks[:, 1].mean() - y0 <= (y1 - y0) * 1.3
    # different people and expressions give different identity coefficients
    ids = np.stack([r.id_coeffs for r in yale_results])
    assert np.linalg.matrix_rank(ids - ids.mean(0), tol=1e-4) == len(ids) - 1


def test_outputs_match_a_direct_forward_pass(yale_results, yale_images, checkpoint):
    net = ReconNet()
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["net_recon"], strict=True)
    net.eval()
    pooled = []  # the backbone's output, caught by a hook rather than by the code under test
    net.backbone.register_forward_hook(lambda module, args, output: pooled.append(output))
    crops = [align_face(image, result.landmarks).crop for result, image in zip(yale_results, yale_images)]
    with torch.no_grad():
        out = net(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))
    features = pooled[0].flatten(1).numpy()
    for row, result in enumerate(yale_results):
        parts = {k: v[row].numpy() for k, v in split_coefficients(out).items()}
        np.testing.assert_allclose(result.id_coeffs, parts["id"], atol=1e-4)
        np.testing.assert_allclose(result.exp_coeffs, parts["exp"], atol=1e-4)
        np.testing.assert_allclose(result.tex_coeffs, parts["tex"], atol=1e-4)
        np.testing.assert_allclose(result.light_coeffs, parts["gamma"], atol=1e-4)
        np.testing.assert_allclose(result.translation, parts["trans"], atol=1e-4)
        np.testing.assert_allclose(result.feature, features[row], atol=1e-4)
        pitch, yaw, roll = np.rad2deg(parts["angle"])
        assert (result.yaw, result.pitch, result.roll) == (pytest.approx(-yaw, abs=1e-3),
                                                          pytest.approx(pitch, abs=1e-3),
                                                          pytest.approx(roll, abs=1e-3))


@pytest.mark.slow  # the R-Net over Yale photos twice
def test_batch_size_does_not_change_results(extractor, yale_images, yale_results, monkeypatch):
    monkeypatch.setattr(extractor, "batch_size", 1)
    one_by_one = extractor.extract(yale_images[:2])
    for a, b in zip(one_by_one, yale_results[:2]):
        np.testing.assert_allclose(a.id_coeffs, b.id_coeffs, atol=1e-4)
        np.testing.assert_allclose(a.feature, b.feature, atol=1e-4)


def test_bad_inputs_get_their_own_rows(extractor, yale_images, yale_results):
    gray = yale_images[0][:, :, 0]  # 2-D grayscale is accepted
    batch = [np.zeros((120, 160, 3), np.uint8), yale_images[1], np.zeros((4,), np.uint8),
             yale_images[1].astype(np.float32), gray]
    results = extractor.extract(batch)
    assert [r.status for r in results] == [STATUS_NO_FACE, STATUS_OK, STATUS_ERROR, STATUS_ERROR, STATUS_OK]
    assert results[0].width == 160 and results[0].id_coeffs is None
    assert "uint8" in results[3].message
    np.testing.assert_allclose(results[1].id_coeffs, yale_results[1].id_coeffs, atol=1e-4)
    np.testing.assert_allclose(results[4].id_coeffs, yale_results[0].id_coeffs, atol=1e-4)
    assert extractor.extract([]) == []


def test_rows_fit_the_coefficients_table(extractor, yale_results):
    rows = [dict(r.to_row(), path=f"img{i}", backend="deep3d") for i, r in enumerate(yale_results)]
    table = rows_to_table(rows, extractor.layout)
    assert table.num_rows == len(yale_results)
    assert layout_from_schema(table.schema) == extractor.layout
    assert len(table.column("light_coeffs")[0].as_py()) == 27


def _rot(axis: int, a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    if axis == 1:  # right-handed rotation about y
        r[i, j], r[j, i] = s, -s
    return r


def test_angles_follow_the_shared_convention():
    # Deep3DFaceRecon: R = Rz(z) Ry(y) Rx(x); facedist: R = Rz(roll) Ry(-yaw) Rx(pitch)
    angle = np.array([0.1, -0.3, 0.2])
    r_deep3d = _rot(2, angle[2]) @ _rot(1, angle[1]) @ _rot(0, angle[0])
    yaw, pitch, roll = np.deg2rad(deep3d_angles_to_degrees(angle))
    np.testing.assert_allclose(_rot(2, roll) @ _rot(1, -yaw) @ _rot(0, pitch), r_deep3d, atol=1e-12)
    np.testing.assert_allclose(deep3d_rotation(angle), r_deep3d, atol=1e-12)


class _FixedLandmarks:
    """A face detector and landmark predictor in one that 'finds' given landmarks (the FaceDetector
    and LandmarkPredictor protocols), for a hand case: the box is the landmarks' bounding box."""

    name = "fixed"
    version = "fixed-1"

    def __init__(self, landmarks: np.ndarray):
        self.landmarks = landmarks
        self.box = np.r_[landmarks.min(0), landmarks.max(0)].astype(np.float32)
        self.boxes_given = []

    def detect_batch(self, images):
        return [[FaceBox(self.box.copy(), 1.0)] for _ in images]

    def predict_batch(self, images, boxes):
        self.boxes_given.extend(np.asarray(b, np.float32) for b in boxes)
        return [self.landmarks.astype(np.float32) for _ in images]


def test_reprojected_landmarks_with_a_bfm_hand_case(tmp_path):
    """Heads with zero weights and a translation bias t = (0.1, -0.2, 0.5): no rotation, mean face.
    With a BFM whose 68 keypoints are the standard face at z = 0, Deep3DFaceRecon's camera (focal
    1015, centre 112, distance 10) puts point (X, Y) at crop column 1015 (X + 0.1) / 9.5 + 112 and
    y-up 1015 (Y - 0.2) / 9.5 + 112, i.e. row 111 - 1015 (Y - 0.2) / 9.5."""
    from scipy.io import loadmat, savemat

    lm68 = loadmat(str(assets.resolve("deep3d/similarity_Lm3D_all.mat")))["lm"].astype(np.float64)
    keypoints3d = np.c_[lm68[:, :2], np.zeros(68)]
    vertices = np.vstack([keypoints3d, -keypoints3d.sum(0)])  # mean vertex 0: recentering is a no-op
    rng = np.random.default_rng(0)
    savemat(tmp_path / "BFM_model_front.mat", {
        "meanshape": vertices.reshape(1, -1), "idBase": rng.normal(size=(3 * 69, 80)),
        "exBase": rng.normal(size=(3 * 69, 64)), "keypoints": np.arange(1, 69)[None, :]})
    net = ReconNet()
    with torch.no_grad():
        net.final_layers[5].bias.copy_(torch.tensor([0.1, -0.2]))
        net.final_layers[6].bias.copy_(torch.tensor([0.5]))
    torch.save({"net_recon": net.state_dict()}, tmp_path / "net.pth")

    up = 51.0 * lm68[:, :2] + [160.0, 120.0]  # the alignment test's hand case (scale 2)
    detected = np.stack([up[:, 0], 239 - up[:, 1]], axis=1)
    fixed = _FixedLandmarks(detected)
    extractor = Deep3DExtractor(detector=fixed, landmark_source=fixed, checkpoint=tmp_path / "net.pth",
                                bfm=tmp_path / "BFM_model_front.mat")
    assert extractor.detector is fixed and extractor.predictor is fixed
    assert (extractor.layout.detector, extractor.layout.landmark_source) == ("fixed-1", "fixed-1")
    (result,) = extractor.extract([np.zeros((240, 320, 3), np.uint8)])
    assert result.status == STATUS_OK, result.message
    # the predictor was asked about the detector's box, and the row reports that box
    assert len(fixed.boxes_given) == 1
    np.testing.assert_array_equal(fixed.boxes_given[0], fixed.box)
    np.testing.assert_array_equal(result.box, fixed.box)
    np.testing.assert_allclose(result.landmarks, detected.astype(np.float32))
    assert np.count_nonzero(result.id_coeffs) == 0 and result.yaw == 0
    np.testing.assert_allclose(result.translation, [0.1, -0.2, 0.5], atol=1e-6)

    transform = result.extras["align_transform"]
    assert transform.scale == pytest.approx(2.0, abs=1e-5)
    expected_crop = np.stack([1015 * (lm68[:, 0] + 0.1) / 9.5 + 112, 111 - 1015 * (lm68[:, 1] - 0.2) / 9.5], axis=1)
    np.testing.assert_allclose(transform.image_to_crop(result.landmarks_fit), expected_crop, atol=1e-3)
    # back on the photo, at half the crop's scale (float32 landmarks may flip upstream's integer
    # truncation of the resized size, moving the window by half a pixel: 0.25 image pixels)
    expected_image = (expected_crop - [112, 111]) / 2 + [160, 239 - 120]
    np.testing.assert_allclose(result.landmarks_fit, expected_image, atol=0.26)
    iod = np.linalg.norm(detected[36] - detected[45])
    error = np.linalg.norm(result.landmarks_fit - detected, axis=1).mean() / iod
    assert result.landmark_error == pytest.approx(error, rel=1e-4) and 0.05 < error < 0.5


def test_without_a_bfm_there_is_no_reprojection(extractor, yale_results):
    assert extractor.bfm is None  # the development assets hold no BFM_model_front.mat
    assert all(r.landmarks_fit is None and r.landmark_error is None for r in yale_results)


def test_a_detector_failure_is_that_rows_error(extractor, yale_images, monkeypatch):
    real = extractor.detector

    class Flaky:  # crashes on any batch holding a 77-px-wide image
        name, version = real.name, real.version

        def detect_batch(self, images):
            if any(rgb.shape[1] == 77 for rgb in images):
                raise RuntimeError("detector crashed")
            return real.detect_batch(images)

    monkeypatch.setattr(extractor, "detector", Flaky())
    results = extractor.extract([np.zeros((50, 77, 3), np.uint8), yale_images[2]])
    assert [r.status for r in results] == [STATUS_ERROR, STATUS_OK]
    assert "detector crashed" in results[0].message and results[0].width == 77
    assert results[0].height == 50 and results[0].id_coeffs is None
