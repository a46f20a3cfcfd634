"""Data set loaders on the real shared data, and sample downloads against a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from priorreg import data
from priorreg.data import (
    DownloadError,
    binary_channels,
    fetch,
    hippocampus_pairs,
    hippocampus_subjects,
    mrus_pairs,
    multimodal_sets,
    oasis_pairs,
    sample_pair,
    split_by_patient,
    split_groups,
    stroke_set,
)
from priorreg.volume import Volume


# ------------------------------------------------------------------------------------ MR-US
def test_mrus_pairs_are_complete_and_grouped_by_patient(shared_data):
    pairs = mrus_pairs(shared_data)
    assert len(pairs) == 80
    assert len({p.id for p in pairs}) == 80
    for p in pairs:
        for path in (p.fixed, p.moving, p.fixed_labels, p.moving_labels):
            assert path.is_file()
    groups = json.loads((shared_data / "mrus_prostate" / "patient_groups.json").read_text())
    for p in pairs:
        obs = int(p.id[3:])
        index = next(i for i, ids in enumerate(groups) if obs in ids)
        assert p.group == f"patient{index:03d}"
        assert p.groups == {p.group}
    by_id = {p.id: p for p in pairs}
    assert by_id["obs004"].group == by_id["obs005"].group != by_id["obs003"].group


def test_mrus_pair_geometry_and_labels(shared_data):
    fixed, moving, fixed_labels, moving_labels = mrus_pairs(shared_data)[0].load()
    assert fixed.array.ndim == moving.array.ndim == 3
    np.testing.assert_allclose(fixed.spacing, 1.5)
    np.testing.assert_allclose(moving.spacing, 1.5)
    assert abs(abs(np.linalg.det(fixed.direction)) - 1) < 1e-6
    # Labels: float64 channels on the image grid, gland first, same landmark count in MR and US.
    assert fixed_labels.array.dtype == np.float64
    assert fixed_labels.shape == fixed.shape and moving_labels.shape == moving.shape
    assert fixed_labels.channels == moving_labels.channels >= 2
    np.testing.assert_allclose(fixed_labels.origin, fixed.origin)
    masks = binary_channels(moving_labels)
    assert masks.array.dtype == np.uint8 and set(np.unique(masks.array)) <= {0, 1}
    assert masks.channels == moving_labels.channels
    assert masks.array[0].sum() > masks.array[1].sum() > 0  # the gland is bigger than a landmark


def test_split_by_patient_is_disjoint_and_seeded(shared_data):
    pairs = mrus_pairs(shared_data)
    split = split_by_patient(pairs, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert sum(len(v) for v in split.values()) == 80  # same-patient pairs are never dropped
    patients = {name: {p.group for p in v} for name, v in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert all(split.values())
    assert split_by_patient(pairs, 0.1, 0.2, seed=0) == split
    assert split_by_patient(pairs, 0.1, 0.2, seed=1)["test"] != split["test"]


def test_bad_split_and_sample_sizes_are_clear_errors(shared_data):
    with pytest.raises(ValueError, match="sum < 1"):
        split_groups(["a", "b"], val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="223 subjects give between 0 and 49506 distinct pairs"):
        hippocampus_pairs(shared_data, n=10**6)


# ------------------------------------------------------------------------------- hippocampus
def test_hippocampus_pairs(shared_data):
    subjects = hippocampus_subjects(shared_data)
    assert len(subjects) == 223
    chain = hippocampus_pairs(shared_data)
    assert len(chain) == 223
    assert hippocampus_pairs(shared_data) == chain
    sample = hippocampus_pairs(shared_data, n=50, seed=3)
    assert len(sample) == 50 == len({p.id for p in sample})
    assert sample == hippocampus_pairs(shared_data, n=50, seed=3)
    assert sample != hippocampus_pairs(shared_data, n=50, seed=4)
    for p in chain + sample:
        assert p.group != p.moving_group and p.fixed != p.moving
        assert p.fixed_labels.is_file() and p.moving_labels.is_file()
    fixed, moving, fixed_labels, _ = sample[0].load()
    assert fixed_labels.shape == fixed.shape and fixed_labels.array.max() <= 2
    np.testing.assert_allclose(fixed.spacing, 1.0)


def test_hippocampus_subject_split_then_pairs_never_mixes_subjects(shared_data):
    split = split_groups(hippocampus_subjects(shared_data), 0.1, 0.2, seed=0)
    for name, subjects in split.items():
        for p in hippocampus_pairs(shared_data, subjects=subjects):
            assert p.groups <= set(subjects), name
    # Splitting ready-made inter-subject pairs drops those that would straddle two splits.
    pairs = hippocampus_pairs(shared_data, n=200, seed=0)
    kept = split_by_patient(pairs, 0.1, 0.2, seed=0)
    seen = {name: set().union(*(p.groups for p in v)) for name, v in kept.items()}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"]


# ---------------------------------------------------------------------------- OASIS, multimodal
def test_oasis_atlas_to_subject(shared_data):
    pairs = oasis_pairs(shared_data)
    assert [p.group for p in pairs] == ["OAS1_0455", "OAS1_0456"]
    for p in pairs:
        assert p.moving.name == "atlasA_norm.nii.gz" and p.moving_labels.name == "atlasA_seg35.nii.gz"
        assert p.fixed_labels.name.endswith("_seg35.nii.gz") and p.fixed_labels.is_file()
        assert p.moving_group is None  # the atlas is shared, not a held-out subject


def test_multimodal_sets_share_a_grid(shared_data):
    sets = multimodal_sets(shared_data)
    assert set(sets) == {"stroke", "tumor_Study1", "tumor_Study3"}
    assert sets["stroke"] == stroke_set(shared_data)
    assert set(sets["stroke"]) == {"T1", "T2", "FLAIR"}
    for name in ("tumor_Study1", "tumor_Study3"):
        assert set(sets[name]) == {"T1pre", "T1post", "T2", "FLAIR"}
    volumes = [Volume.read(p) for p in sets["tumor_Study3"].values()]
    for v in volumes[1:]:
        assert v.shape == volumes[0].shape
        np.testing.assert_allclose(v.spacing, volumes[0].spacing, rtol=1e-5)


@pytest.mark.parametrize("loader", [mrus_pairs, hippocampus_pairs, oasis_pairs, multimodal_sets, stroke_set])
def test_missing_data_names_the_folder_and_the_fix(tmp_path, loader):
    with pytest.raises(FileNotFoundError, match="PRIORREG_DATA.*--data-root") as info:
        loader(tmp_path)
    assert str(tmp_path) in str(info.value)


# --------------------------------------------------------------------------- sample downloads
@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving `served/`, counting the requests it answers."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def local_samples(server, shared_data, monkeypatch):
    """The real sample registry, with the public URL prefix pointed at the local server."""
    url, served, requests = server
    for entry in data.SAMPLES:
        source = shared_data / entry["filename"]
        target = served / entry["url"].removeprefix(data._MRUS_URL)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    samples = tuple({**e, "url": e["url"].replace(data._MRUS_URL, url)} for e in data.SAMPLES)
    monkeypatch.setattr(data, "SAMPLES", samples)
    return samples, requests


def test_sample_pair_downloads_once_into_the_cache(local_samples, tmp_path, monkeypatch):
    samples, requests = local_samples
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRIORREG_CACHE", str(cache))
    empty_root = tmp_path / "no_data"
    pair = sample_pair("mrus", root=empty_root)
    assert len(requests) == 4
    for path in (pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels):
        assert path.is_relative_to(cache)
    for entry in samples:  # the registry's checksums are those of the shared files
        assert hashlib.sha256((cache / entry["filename"]).read_bytes()).hexdigest() == entry["sha256"]
    assert not list(cache.rglob("*.partial"))
    assert sample_pair("mrus", root=empty_root) == pair
    assert len(requests) == 4  # cached with the right checksum: no second download
    fixed, _, fixed_labels, _ = pair.load()
    assert fixed_labels.shape == fixed.shape


def test_corrupt_cache_file_is_downloaded_again(local_samples, tmp_path):
    samples, requests = local_samples
    cache = tmp_path / "cache"
    (cache / samples[0]["filename"]).parent.mkdir(parents=True)
    (cache / samples[0]["filename"]).write_bytes(b"truncated")
    path = fetch(samples[0], root=tmp_path / "no_data", cache=cache)
    assert len(requests) == 1
    assert hashlib.sha256(path.read_bytes()).hexdigest() == samples[0]["sha256"]


def test_checksum_mismatch_leaves_nothing_in_the_cache(local_samples, tmp_path):
    samples, requests = local_samples
    cache = tmp_path / "cache"
    wrong = {**samples[0], "sha256": "0" * 64}
    with pytest.raises(DownloadError, match="does not match the expected 0{64}"):
        fetch(wrong, root=tmp_path / "no_data", cache=cache)
    assert len(requests) == 1
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_unreachable_url_is_a_clear_error(server, tmp_path):
    url, _, _ = server
    entry = {"name": "x", "role": "fixed", "filename": "x/missing.nii.gz", "url": url + "missing.nii.gz"}
    entry["sha256"] = "0" * 64
    with pytest.raises(DownloadError, match="cannot download .*missing.nii.gz.*PRIORREG_DATA"):
        fetch(entry, root=tmp_path / "no_data", cache=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_files_in_the_data_root_are_never_downloaded(local_samples, shared_data, tmp_path):
    _, requests = local_samples
    pair = sample_pair("mrus", root=shared_data, cache=tmp_path / "cache")
    assert requests == []
    assert pair.fixed == shared_data / "mrus_prostate" / "fixed_images" / "obs000.nii.gz"
    assert not (tmp_path / "cache").exists()


def test_unknown_sample_name():
    with pytest.raises(ValueError, match="unknown sample 'nope'; available: \\['mrus'\\]"):
        sample_pair("nope")
