"""face-api's expression and age/gender nets on torch, held to face-api's own outputs.

tests/data/faceapi/reference.json is what @vladmandic/face-api 1.7.15 computes (tfjs, CPU backend)
on tests/data/faceapi/face.png for three boxes (see its README); the real weights load from the
model directory. Tolerances are about 100x the largest differences measured (input pixels 2e-5,
feature 1e-5, probabilities 5e-7, age 7e-5 years).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facedist.face_attributes import FaceAttributeNets, faceapi_inputs
from facedist.models.faceapi import (AGE_GENDER_MANIFEST, EXPRESSION_MANIFEST, AgeGenderNet,
                                     FaceExpressionNet, load_faceapi_weights, resolve_manifest)

DATA = Path(__file__).parent / "data" / "faceapi"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "reference.json").read_text())


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(DATA / "face.png").convert("RGB"))


@pytest.fixture(scope="module")
def nets() -> FaceAttributeNets:
    torch.set_num_threads(1)
    return FaceAttributeNets()


def test_the_crop_is_face_apis(reference, face):
    """Clipping at the borders, centred black padding to a square and TF's bilinear resize: the
    same 112x112 input as face-api's, for a tall box, one past the corner and a wide one."""
    cases = reference["cases"]
    inputs = faceapi_inputs([face] * len(cases), [c["box"] for c in cases.values()])
    assert inputs.shape == (len(cases), 3, 112, 112) and inputs.dtype == np.float32
    for x, case in zip(inputs, cases.values()):
        for pixel in case["input_pixels"]:
            np.testing.assert_allclose(x[:, pixel["row"], pixel["col"]], pixel["rgb"], atol=2e-3)
        np.testing.assert_allclose(x.mean(axis=(1, 2)), case["input_mean_rgb"], atol=2e-3)


def test_the_nets_give_face_apis_outputs(reference, face, nets):
    cases = reference["cases"]
    assert list(nets.expressions) == reference["expressions"]
    out = nets.predict([face] * len(cases), [c["box"] for c in cases.values()])
    assert out["expression_feature"].shape == (3, 256) and out["expression_probs"].shape == (3, 7)
    for i, case in enumerate(cases.values()):
        np.testing.assert_allclose(out["expression_feature"][i], case["expression_feature"], atol=1e-3)
        np.testing.assert_allclose(out["expression_probs"][i], case["expression_probs"], atol=5e-5)
        np.testing.assert_allclose(out["faceapi_age"][i], case["age"], atol=1e-2)
        np.testing.assert_allclose(out["faceapi_gender_male"][i], case["gender_prob_male"], atol=5e-5)
    np.testing.assert_allclose(out["expression_probs"].sum(axis=1), 1.0, atol=1e-5)


def test_a_batch_gives_each_image_what_it_gets_alone(reference, face, nets):
    boxes = [c["box"] for c in reference["cases"].values()]
    together = nets.predict([face] * 3, boxes)
    alone = nets.predict([face], boxes[1:2])
    for key, value in alone.items():
        np.testing.assert_allclose(together[key][1:2], value, rtol=1e-4, atol=1e-4)
    empty = nets.predict([], np.zeros((0, 4)))
    assert empty["expression_probs"].shape == (0, 7) and empty["faceapi_age"].shape == (0,)


def test_box_mode_fills_the_input_where_face_api_pads(reference, face):
    """square='pad' (face-api's) puts black bars beside a tall face; square='box' crops a square
    of image around it instead."""
    box = reference["cases"]["faceboxes"]["box"]
    padded, boxed = faceapi_inputs([face], [box]), faceapi_inputs([face], [box], square="box")
    assert padded[0, :, :, :5].max() == 0 and padded[0, :, :, -5:].max() == 0
    assert boxed[0, :, :, :5].mean() > 20 and boxed[0, :, :, -5:].mean() > 20
    with pytest.raises(ValueError, match="one box per image"):
        faceapi_inputs([face, face], [box])
    with pytest.raises(ValueError, match="outside"):
        faceapi_inputs([face], [[500, 500, 600, 600]])


def test_strict_loading_refuses_a_missing_or_renamed_tensor(tmp_path):
    manifest = resolve_manifest(EXPRESSION_MANIFEST)
    groups = json.loads(manifest.read_text())
    data = (manifest.parent / groups[0]["paths"][0]).read_bytes()
    path, binary = tmp_path / manifest.name, tmp_path / groups[0]["paths"][0]
    last = groups[0]["weights"][-1]
    assert last["name"] == "fc/bias" and last["dtype"] == "float32"  # 7 raw float32, packed last
    # Missing: the last tensor dropped from the manifest and its bytes from the .bin.
    groups[0]["weights"] = groups[0]["weights"][:-1]
    path.write_text(json.dumps(groups))
    binary.write_bytes(data[:-7 * 4])
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*fc\.bias"):
        load_faceapi_weights(FaceExpressionNet(), path)
    # Renamed: every byte in place, one name the net does not have.
    groups[0]["weights"].append({**last, "name": "fc2/bias"})
    path.write_text(json.dumps(groups))
    binary.write_bytes(data)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*fc2\.bias"):
        load_faceapi_weights(FaceExpressionNet(), path)


def test_the_registry_builds_both_nets_with_their_weights():
    from facedist.models.registry import create_model
    from facedist.models.tfjs import load_tfjs_weights

    for name, manifest in (("faceapi_expression", EXPRESSION_MANIFEST), ("faceapi_age_gender", AGE_GENDER_MANIFEST)):
        model = create_model(name, pretrained=True)
        weights = load_tfjs_weights(resolve_manifest(manifest))
        assert len(model.state_dict()) == len(weights) and not model.training
        bias = "fc.bias" if name == "faceapi_expression" else "fc.gender.bias"
        np.testing.assert_array_equal(model.state_dict()[bias].numpy(), weights[bias.replace(".", "/")])


def test_one_nets_weights_do_not_load_into_the_other():
    with pytest.raises(RuntimeError, match="Missing key"):
        load_faceapi_weights(AgeGenderNet(), resolve_manifest(EXPRESSION_MANIFEST))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_faceapi_weights(FaceExpressionNet(), resolve_manifest(AGE_GENDER_MANIFEST))


class _FailsOnce:
    """FaceAttributeNets whose batched call fails, and whose face-by-face call fails on the second
    face: the extractor must fall back to single faces and turn only that face into an error."""

    def __init__(self, inner):
        self.inner, self.version, self.calls = inner, inner.version, 0

    def predict(self, images, boxes):
        self.calls += 1
        if len(images) > 1 or self.calls == 3:
            raise RuntimeError("scripted failure")
        return self.inner.predict(images, boxes)


def test_extractor_fills_each_ok_face_from_its_detector_box(nets, yale_dir):
    from facedist.extractors import make_extractor
    from facedist.images import decode_image

    images = [decode_image((yale_dir / name).read_bytes())
              for name in ("subject01.happy", "subject02.sad", "subject03.normal")]
    extractor = make_extractor("tddfa", face_attributes=nets, face_embedding=False, texture=False)
    assert extractor.layout.face_attributes == nets.version
    results = extractor.extract(images)
    assert all(r.ok for r in results)
    expected = nets.predict(images, [r.box for r in results])
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.expression_feature, expected["expression_feature"][i], atol=1e-5)
        np.testing.assert_allclose(result.expression_probs, expected["expression_probs"][i], atol=1e-6)
        assert result.faceapi_age == pytest.approx(float(expected["faceapi_age"][i]), abs=1e-4)
        assert result.faceapi_gender_male == pytest.approx(float(expected["faceapi_gender_male"][i]), abs=1e-6)
        row = result.to_row()
        assert len(row["expression_feature"]) == 256 and len(row["expression_probs"]) == 7
        assert isinstance(row["faceapi_age"], float) and isinstance(row["faceapi_gender_male"], float)

    extractor.enable_face_attributes(_FailsOnce(nets))
    results = extractor.extract(images)
    assert [r.ok for r in results] == [True, False, True]
    assert "face attributes failed: RuntimeError: scripted failure" in results[1].message
    assert results[1].box is not None and results[1].expression_probs is None and results[1].faceapi_age is None
    assert results[2].expression_feature.shape == (256,)

    plain = make_extractor("tddfa", face_attributes=False, face_embedding=False, texture=False)
    assert plain.layout.face_attributes == "" and plain.extract(images[:1])[0].expression_probs is None
