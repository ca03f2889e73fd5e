"""Texture: colour sampled on the fitted mesh, the PCA basis file, tex_coeffs from the extractor."""

from __future__ import annotations

import numpy as np
import pytest

from facedist import SettingsError
from facedist.cli import main as cli_main
from facedist.extractors import make_extractor
from facedist.images import decode_image
from facedist.morphable import MorphableModel, Pose
from facedist.schema import STATUS_OK
from facedist.texture import TextureBasis, TextureSampler, texture_array


@pytest.fixture(scope="module")
def sampler() -> TextureSampler:
    return TextureSampler(MorphableModel.from_tddfa())


def _frontal(yaw: float = 0.0) -> np.ndarray:
    # about 200 px across a 400 x 400 image
    return Pose.from_angles(yaw, 0.0, 0.0, scale=0.0011, translation=(200, 200, 0)).affine()


def test_sampler_reads_the_colour_under_each_vertex(sampler):
    """Left half of the image red, right half blue: vertices projected left read red, right blue."""
    image = np.zeros((400, 400, 3), np.uint8)
    image[:, :200] = (220, 10, 10)
    image[:, 200:] = (10, 10, 220)
    camera = _frontal()
    texture = sampler.sample(image, None, None, camera)
    u = sampler.points(None, None, camera)[:, 0]
    visible = texture[:, 3] == 255
    assert texture.shape == (sampler.n_vertices, 4) and texture.dtype == np.uint8
    assert visible.mean() > 0.9  # a frontal face is nearly all visible
    left, right = visible & (u < 190), visible & (u > 210)  # away from the seam (the anti-aliasing blur)
    assert (texture[left, 0] > 200).all() and (texture[left, 2] < 30).all()
    assert (texture[right, 2] > 200).all() and (texture[right, 0] < 30).all()


def test_turned_faces_hide_their_far_side_and_the_image_border_clips(sampler):
    image = np.full((400, 400, 3), 128, np.uint8)
    frontal = sampler.sample(image, None, None, _frontal())[:, 3] == 255
    turned = sampler.sample(image, None, None, _frontal(70.0))[:, 3] == 255
    assert turned.sum() < 0.8 * frontal.sum()
    # a face half outside the image: the outside vertices are not visible
    shifted = _frontal()
    shifted[0, 3] = 0.0  # face centred on the left border
    u = sampler.points(None, None, shifted)[:, 0]
    clipped = sampler.sample(image, None, None, shifted)[:, 3] == 255
    assert not clipped[u < 0].any() and clipped[u > 5].mean() > 0.8


def test_basis_round_trip_projection_and_hidden_vertices(sampler):
    rng = np.random.default_rng(0)
    n, k = 40, sampler.n_vertices
    # textures = mean colour + 3 latent factors + noise, all visible
    factors = rng.normal(size=(3, k, 3)) * 20
    z = rng.normal(size=(n, 3))
    colour = np.clip(128 + np.einsum("nf,fkc->nkc", z, factors) + rng.normal(0, 2, (n, k, 3)), 0, 255)
    textures = np.concatenate([colour.astype(np.uint8), np.full((n, k, 1), 255, np.uint8)], axis=2)
    basis = TextureBasis.fit(textures, sampler.version, n_components=10)
    assert basis.n_components == 10 and basis.n_vertices == k
    tex_coeffs = basis.project(textures)
    # the 3 latent factors dominate: the first 3 coefficients span them (R^2 of each factor)
    design = np.hstack([tex_coeffs[:, :3], np.ones((n, 1))])
    residual = z - design @ np.linalg.lstsq(design, z, rcond=None)[0]
    assert (1 - residual.var(0) / z.var(0)).min() > 0.9
    again = TextureBasis.from_bytes(basis.to_bytes())
    np.testing.assert_array_equal(again.project(textures), tex_coeffs)
    assert again.version == basis.version and again.sampler_version == sampler.version
    # hidden vertices take the basis mean: whatever colour they hold does not change tex_coeffs
    hidden = textures.copy()
    hidden[:, : k // 3, 3] = 0
    scrambled = hidden.copy()
    scrambled[:, : k // 3, :3] = rng.integers(0, 255, (n, k // 3, 3))
    np.testing.assert_allclose(basis.project(hidden), basis.project(scrambled), atol=1e-5)
    with pytest.raises(ValueError):
        basis.project(textures[:, :10])


def test_texture_array_reads_table_values():
    values = [list(range(8)), None, [1, 2]]
    out = texture_array(values, 2)
    assert out.shape == (3, 2, 4)
    np.testing.assert_array_equal(out[0].ravel(), range(8))
    assert not out[1:].any()  # missing or malformed: all invisible


def test_a_basis_from_other_samples_is_refused(sampler):
    textures = np.full((3, sampler.n_vertices, 4), 200, np.uint8)
    textures[:, :, 0] = [[10], [100], [200]]
    basis = TextureBasis.fit(textures, "some_other_mesh:0123", 2)
    with pytest.raises(SettingsError, match="texture basis was fitted"):
        make_extractor("tddfa-fit", texture_basis=basis)
    with pytest.raises(SettingsError, match="does not sample texture"):
        make_extractor("deep3d", texture_basis=basis)
    with pytest.raises(SettingsError, match="--no-texture"):
        make_extractor("tddfa-fit", texture=False, texture_basis=basis)


def test_the_default_basis_goes_only_where_texture_is_sampled():
    """deep3d regresses its own texture and --no-texture samples none: the default basis is
    left out there instead of failing; the texture backends get the shipped file."""
    from facedist import assets
    from facedist.cli import build_parser, extract_config_from_args
    from facedist.extractors import DEFAULT_TEXTURE_BASIS, texture_basis_for
    from facedist.extractors.backends import texture_backends

    shipped = str(assets.resolve(assets.DEFAULT_TEXTURE_BASIS_FILE))
    assert all(texture_basis_for(b, True, DEFAULT_TEXTURE_BASIS) == shipped for b in texture_backends())
    assert texture_basis_for("deep3d", True, DEFAULT_TEXTURE_BASIS) is None
    assert texture_basis_for("tddfa-fit", False, DEFAULT_TEXTURE_BASIS) is None
    assert texture_basis_for("tddfa-fit", True, None) is None
    parser = build_parser()
    for argv, expected in ((["--backend", "deep3d"], DEFAULT_TEXTURE_BASIS), (["--texture-basis", "none"], None),
                           (["--texture-basis", "NONE"], None), ([], DEFAULT_TEXTURE_BASIS)):
        args = parser.parse_args(["extract", "images", "--out", "out", *argv])
        assert extract_config_from_args(args).texture_basis == expected, argv


@pytest.mark.slow  # two extraction runs
def test_extract_fit_basis_then_extract_with_tex_coeffs(yale_dir, tmp_path, capsys):
    """The user's flow: extract (texture sampled), `facedist texture fit`, extract again with the
    basis: tex_coeffs filled, and the output refuses rows made with another basis."""
    from facedist import storage

    images = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject0"))[:24]
    folder = tmp_path / "images"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    first, basis_uri, second = tmp_path / "t1", str(tmp_path / "basis.npz"), tmp_path / "t2"
    assert cli_main(["extract", str(folder), "--out", str(first), "--texture-basis", "none"]) == 0
    table = storage.read_table(str(first))
    ok = [r for r in table.to_pylist() if r["status"] == STATUS_OK]
    assert len(ok) >= 22
    assert all(len(r["texture"]) % 4 == 0 and r["tex_coeffs"] is None for r in ok)
    assert cli_main(["texture", "fit", "--data", str(first), "--out", basis_uri, "--components", "8"]) == 0
    assert "8 components" in capsys.readouterr().out
    assert cli_main(["extract", str(folder), "--out", str(second), "--texture-basis", basis_uri]) == 0
    rows = [r for r in storage.read_table(str(second)).to_pylist() if r["status"] == STATUS_OK]
    assert len(rows) == len(ok) and all(len(r["tex_coeffs"]) == 8 for r in rows)
    tex_coeffs = np.array([r["tex_coeffs"] for r in rows])
    assert np.isfinite(tex_coeffs).all() and tex_coeffs.std(0).min() > 0.1  # faces differ in texture
    # same images, same basis: what the extractor wrote is the basis's projection of the samples
    basis = TextureBasis.load(basis_uri)
    textures = texture_array([r["texture"] for r in rows], basis.n_vertices)
    np.testing.assert_allclose(basis.project(textures), tex_coeffs, rtol=1e-4, atol=1e-4)
    # resuming into the same output with another basis (the default) is another layout: refused before any work
    assert cli_main(["extract", str(folder), "--out", str(second)]) == 2


@pytest.mark.slow  # many Yale photos
def test_texture_of_real_faces_identifies_people(yale_dir):
    """On Yale, two photos of one person have closer texture coefficients than photos of two
    people (a basis fitted on the other people)."""
    extractor = make_extractor("tddfa-fit")
    paths = sorted(p for p in yale_dir.iterdir() if p.name.endswith((".normal", ".happy", ".glasses")))
    results = extractor.extract([decode_image(p.read_bytes()) for p in paths])
    keep = [i for i, r in enumerate(results) if r.ok]
    subjects = np.array([paths[i].name.split(".")[0] for i in keep])
    textures = np.stack([results[i].texture for i in keep])
    people = sorted(set(subjects))
    train = np.isin(subjects, people[:8])
    tex_coeffs = TextureBasis.fit(textures[train], extractor.texture_sampler.version, 20).project(textures[~train])
    s = subjects[~train]
    dist = np.linalg.norm(tex_coeffs[:, None] - tex_coeffs[None], axis=2)
    same = dist[(s[:, None] == s[None]) & ~np.eye(len(s), dtype=bool)]
    other = dist[s[:, None] != s[None]]
    print(f"\ntexture distance, same person {np.median(same):.2f} vs other people {np.median(other):.2f}")
    assert np.median(same) < 0.8 * np.median(other)
