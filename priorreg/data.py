"""The shared data sets: where they live and how pairs are formed.

The data root comes from `--data-root`, else `PRIORREG_DATA`, else `../shared/data`
beside the checkout (the layout CI and developers use). Its layout and caveats are in
`README.md` of that folder.

Every loader returns paths, not arrays, so that listing and splitting a data set is
instant and a training loop reads only what it uses; `Pair.load()` reads the Volumes.

Splits are made by patient (or subject), never by image: MR-US observations of one patient
share the MR, and an evaluation that saw the patient in training measures memory, not
registration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.request import urlopen

import numpy as np

from .volume import READ_SUFFIXES, Volume

_REPO = Path(__file__).resolve().parent.parent


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: `explicit`, else `$PRIORREG_DATA`, else `../shared/data` beside the repository."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PRIORREG_DATA")
    if env:
        return Path(env)
    return _REPO.parent / "shared" / "data"


def _folder(root: str | os.PathLike | None, *parts: str) -> Path:
    """A data set folder, or a `FileNotFoundError` that tells the user how to point at the data."""
    folder = data_root(root).joinpath(*parts)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data folder not found: {folder}; set PRIORREG_DATA to the folder holding the shared "
            f"data sets, or pass --data-root"
        )
    return folder


def _require(path: Path) -> Path:
    """A file the data set layout promises; a named error beats a failure deep in a training loop."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the data set (an incomplete copy of the data root?)")
    return path


# ---------------------------------------------------------------------------------------- pairs
class PairVolumes(NamedTuple):
    """What `Pair.load` reads; labels are None where the data set has none."""

    fixed: Volume
    moving: Volume
    fixed_labels: Volume | None
    moving_labels: Volume | None


@dataclass(frozen=True)
class Pair:
    """One registration task: warp `moving` onto `fixed`.

    `group` is the patient (or subject) whose data must stay in one split. `moving_group` is
    set only when the moving image is another subject (inter-subject pairs): both then count.
    A shared atlas is not a held-out subject and gets no group.
    """

    id: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    group: str = ""
    moving_group: str | None = None

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(g for g in (self.group, self.moving_group) if g)

    def load(self) -> PairVolumes:
        """Read the images and labels as stored (MR-US labels stay float64 channels)."""

        def read(path):
            return Volume.read(path) if path is not None else None

        return PairVolumes(read(self.fixed), read(self.moving), read(self.fixed_labels), read(self.moving_labels))


def binary_channels(volume: Volume) -> Volume:
    """Binary uint8 masks from soft labels, thresholded at 0.5 (the MR-US convention, Hu et al.)."""
    out = volume.with_array((volume.array >= 0.5).astype(np.uint8))
    out.source = volume.source
    return out


def select_channels(labels: Volume | None, channels: Sequence[int] | None) -> Volume | None:
    """The label channels that drive a registration (e.g. the MR-US gland, channel 0, never the landmarks).

    4D labels keep `channels`; an integer label map is returned whole. None where either is None.
    """
    if labels is None or channels is None:
        return None
    if labels.array.ndim != 4:
        return labels
    if max(channels) >= labels.channels:
        raise ValueError(f"{labels.source}: has {labels.channels} channels, asked for {list(channels)}")
    return labels.with_array(labels.array[list(channels)])


# ------------------------------------------------------------------------------------ splitting
def split_groups(
    groups: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[str]]:
    """Shuffle the distinct groups with `seed` and cut them into train, val and test.

    Fractions count groups (patients), not images, and are rounded to whole groups.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0 "
            f"and leave something to train on (sum < 1)"
        )
    order = sorted(set(groups))
    random.Random(seed).shuffle(order)
    n_test = round(test_fraction * len(order))
    n_val = round(val_fraction * len(order))
    return {
        "train": sorted(order[n_test + n_val :]),
        "val": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def split_by_patient(
    pairs: Sequence[Pair], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[Pair]]:
    """Split pairs so that no patient appears in two splits (deterministic for a seed).

    Groups are split with `split_groups`; a pair goes to the split holding all of its groups.
    An inter-subject pair whose two subjects landed in different splits is dropped: keeping it
    would leak a subject. To keep every subject's pairs, split `hippocampus_subjects()` with
    `split_groups` first and form pairs within each split (`hippocampus_pairs(subjects=...)`).
    """
    splits = split_groups([g for p in pairs for g in p.groups], val_fraction, test_fraction, seed)
    where = {g: name for name, gs in splits.items() for g in gs}
    out: dict[str, list[Pair]] = {name: [] for name in splits}
    for pair in pairs:
        names = {where[g] for g in pair.groups}
        if len(names) == 1:
            out[names.pop()].append(pair)
    return out


# ----------------------------------------------------------------------------------- data sets
def mrus_pairs(root: str | os.PathLike | None = None) -> list[Pair]:
    """The 80 prostate MR (moving) to TRUS (fixed) observations, with labels, sorted by id.

    The group of observation N is `patientIII`, where III is the index of the list holding N in
    `patient_groups.json` (the file lists all 108 original observation ids; 80 are present).
    """
    folder = _folder(root, "mrus_prostate")
    groups_file = _require(folder / "patient_groups.json")
    patient_of: dict[int, str] = {}
    for index, ids in enumerate(json.loads(groups_file.read_text())):
        for obs in ids:
            if obs in patient_of:
                raise ValueError(f"{groups_file}: observation {obs} is listed for two patients")
            patient_of[obs] = f"patient{index:03d}"
    pairs = []
    for fixed in sorted((folder / "fixed_images").glob("obs*.nii.gz")):
        name = fixed.name
        obs = int(name[3:].split(".")[0])
        if obs not in patient_of:
            raise ValueError(f"{groups_file}: no patient group lists observation {obs} ({fixed})")
        pairs.append(
            Pair(
                id=name.split(".")[0],
                fixed=fixed,
                moving=_require(folder / "moving_images" / name),
                fixed_labels=_require(folder / "fixed_labels" / name),
                moving_labels=_require(folder / "moving_labels" / name),
                group=patient_of[obs],
            )
        )
    if not pairs:
        raise FileNotFoundError(f"no observations in {folder / 'fixed_images'}; is the data root complete?")
    return pairs


def hippocampus_subjects(root: str | os.PathLike | None = None) -> list[str]:
    """The subject ids ("001", "003", ...) that have both an image and a label file."""
    folder = _folder(root, "hippocampus")
    images = (folder / "images").glob("hippocampus_*.nii.gz")
    ids = sorted(p.name[len("hippocampus_") : -len(".nii.gz")] for p in images)
    if not ids:
        raise FileNotFoundError(f"no images in {folder / 'images'}; is the data root complete?")
    for s in ids:
        _require(folder / "labels" / f"hippocampus_{s}.nii.gz")
    return ids


def hippocampus_files(subject: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The image and label file of one subject."""
    folder = _folder(root, "hippocampus")
    name = f"hippocampus_{subject}.nii.gz"
    return _require(folder / "images" / name), _require(folder / "labels" / name)


def hippocampus_pairs(
    root: str | os.PathLike | None = None,
    n: int | None = None,
    seed: int = 0,
    subjects: Sequence[str] | None = None,
) -> list[Pair]:
    """Inter-subject hippocampus pairs, among `subjects` (default: all).

    With `n=None`, each subject (sorted) is fixed once, with the next one (cyclically) as moving,
    so every subject is used twice and the list is the same everywhere. With `n`, a seeded
    sample of `n` distinct ordered pairs of different subjects.
    """
    _folder(root, "hippocampus")  # a clear error where the data set is missing
    ids = sorted(subjects) if subjects is not None else hippocampus_subjects(root)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 subjects to form inter-subject pairs, got {len(ids)}")
    m = len(ids) - 1
    if n is None:
        index_pairs = [(a, (a + 1) % len(ids)) for a in range(len(ids))]
    elif not 0 <= n <= len(ids) * m:
        raise ValueError(f"n={n}: {len(ids)} subjects give between 0 and {len(ids) * m} distinct pairs")
    else:
        # Number the N*(N-1) ordered pairs without listing them: k -> (a, b), b skipping a.
        ks = random.Random(seed).sample(range(len(ids) * m), n)
        index_pairs = [(k // m, k % m + (k % m >= k // m)) for k in ks]

    pairs = []
    for a, b in index_pairs:
        (fi, fl), (mi, ml) = hippocampus_files(ids[a], root), hippocampus_files(ids[b], root)
        pairs.append(Pair(f"{ids[b]}_to_{ids[a]}", fi, mi, fl, ml, group=ids[a], moving_group=ids[b]))
    return pairs


def oasis_pairs(root: str | os.PathLike | None = None, atlas: str = "atlasA") -> list[Pair]:
    """Atlas-to-subject OASIS pairs: the atlas is moving and each subject with seg35 labels fixed.

    This is the direction of the Deep Image Prior registration paper (and of VoxelMorph's atlas
    experiments): the atlas is warped onto each subject. Labels are the 35-structure maps.
    """
    folder = _folder(root, "brain_oasis")
    atlas_image = _require(folder / f"{atlas}_norm.nii.gz")
    atlas_labels = _require(folder / f"{atlas}_seg35.nii.gz")
    pairs = []
    for labels in sorted(folder.glob("*_seg35.nii.gz")):
        subject = labels.name[: -len("_seg35.nii.gz")]
        if subject != atlas:
            image = _require(folder / f"{subject}_norm.nii.gz")
            pairs.append(Pair(f"{atlas}_to_{subject}", image, atlas_image, labels, atlas_labels, group=subject))
    return pairs


FOLDER_ROLES = ("fixed", "moving", "fixed_labels", "moving_labels")


def folder_pairs(folder: str | os.PathLike) -> list[Pair]:
    """A user's own training pairs: one subfolder per pair, sorted by name.

    Each subfolder holds `fixed.<ext>` and `moving.<ext>` and, for label-driven training,
    `fixed_labels.<ext>` and `moving_labels.<ext>` (integer maps, structures paired by value, or
    4D channels), in any format ITK reads (.nii.gz, .nii, .nrrd, .mha, ...). The subfolder's name
    is the pair's id and its group: pairs of one patient must share a subfolder name prefix up to
    a double underscore (`patient7__visit1`, `patient7__visit2`) to stay in one split.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of pairs (one subfolder per pair with fixed.* and moving.*)")
    pairs = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {}
        for role in FOLDER_ROLES:
            found = [f for f in sub.iterdir() if f.name.lower() in {role + s for s in READ_SUFFIXES}]
            if len(found) > 1:
                raise ValueError(f"{sub}: {len(found)} files for {role} ({', '.join(f.name for f in found)}); keep one")
            files[role] = found[0] if found else None
        if files["fixed"] is None and files["moving"] is None:
            continue  # not a pair folder
        missing = [r for r in FOLDER_ROLES[:2] if files[r] is None]
        if missing:
            raise ValueError(f"{sub}: no {' or '.join(missing)} image (fixed.*, moving.*: {', '.join(READ_SUFFIXES)})")
        if (files["fixed_labels"] is None) != (files["moving_labels"] is None):
            raise ValueError(f"{sub}: labels for one image only; give fixed_labels.* and moving_labels.*, or neither")
        pairs.append(Pair(sub.name, files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"], group=sub.name.split("__")[0]))
    if not pairs:
        raise ValueError(f"{folder}: no pair subfolders (each needs fixed.* and moving.*, e.g. {folder}/case01/fixed.nii.gz)")
    return pairs


# Tumour files are named Study<N>_<series>-<modality>[reg]-<id>.nii.gz; "reg" marks the series
# resampled onto the post-contrast T1 grid, which the modality name drops.
_TUMOR_FILE = re.compile(r"^(Study\d+)_\d+-([A-Za-z0-9]+?)(?:reg)?-\d+\.nii\.gz$")


def multimodal_sets(root: str | os.PathLike | None = None) -> dict[str, dict[str, Path]]:
    """Co-registered multi-modal sets, {set: {modality: path}}, for synthetic-deformation tests.

    Sets: "stroke" (T1, T2, FLAIR) and one per tumour study, "tumor_Study1", ...
    (T1pre, T1post, T2, FLAIR). The modalities of one set share a grid.
    """
    sets = {"stroke": stroke_set(root)}
    for path in sorted(_folder(root, "brain_multimodal", "tumor").glob("*.nii.gz")):
        match = _TUMOR_FILE.match(path.name)
        if match:
            study, modality = match.groups()
            sets.setdefault(f"tumor_{study}", {})[modality] = path
    return sets


def stroke_set(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The chronic-stroke patient's co-registered {"T1", "T2", "FLAIR"} images."""
    folder = _folder(root, "brain_multimodal", "stroke")
    return {m: _require(folder / f"{m}.nii.gz") for m in ("T1", "T2", "FLAIR")}


# -------------------------------------------------------------------------------- sample data
# Public copies of sample pairs for users without the shared data. Plain data (name, role,
# filename, url, sha256) so that Slicer's SampleData module can register the same list.
# `filename` is the path under the data root and under the cache; checksums are those of
# the shared data's MANIFEST.sha256.
# The URL layout (branch "mrus", folders at the repository top level) matches an indexed copy
# of YipengHu/example-data but has not been fetched from GitHub: check it when a session has
# network (the tests serve the shared files locally instead).
_MRUS_URL = "https://github.com/YipengHu/example-data/raw/mrus/"


def _mrus_sample(role: str, path: str, sha256: str) -> dict[str, str]:
    return {
        "name": "mrus",
        "role": role,
        "filename": f"mrus_prostate/{path}",
        "url": _MRUS_URL + path,
        "sha256": sha256,
    }


SAMPLES: tuple[dict[str, str], ...] = (
    _mrus_sample(
        "fixed", "fixed_images/obs000.nii.gz", "42f0b13a7bd126de8aa68af63a609a7dff2371c3a1961016e8ceecfbeb6a8833"
    ),
    _mrus_sample(
        "moving", "moving_images/obs000.nii.gz", "85dff60e08d0689522ef93e37e124007c131e8a41bf0a21e25bb278fd1a5dc61"
    ),
    _mrus_sample(
        "fixed_labels", "fixed_labels/obs000.nii.gz", "82c210b930979186621c39a5af87d5bc9c1c513973709acecfa38a24bdc1f181"
    ),
    _mrus_sample(
        "moving_labels", "moving_labels/obs000.nii.gz", "cd705ab6dfa0704dc50670158c61963ba02035268fad5028a838e47ed8b70fc6"
    ),
)


class DownloadError(OSError):
    """A sample file could not be downloaded or did not match its checksum."""


def cache_dir() -> Path:
    """Where downloaded samples live: `$PRIORREG_CACHE`, else `~/.cache/priorreg`."""
    env = os.environ.get("PRIORREG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "priorreg"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, fd: int, local: Path) -> str:
    """Stream `url` into the open file `fd`; return the SHA256 of what was written."""
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except OSError as e:  # URLError, HTTPError and socket errors are all OSErrors
        raise DownloadError(
            f"cannot download {url} ({e}); to work offline, put the file at {local} "
            f"(set PRIORREG_DATA or pass --data-root)"
        ) from e
    return digest.hexdigest()


def fetch(
    entry: dict[str, str], root: str | os.PathLike | None = None, cache: str | os.PathLike | None = None
) -> Path:
    """The local path of one sample file, downloading it only when neither copy exists.

    A file in the data root is used as is (the shared data is checked by its MANIFEST); a cached
    file must match `sha256`. A download goes to a temporary file beside the target and is renamed
    only once its checksum matches, so an interrupted or corrupt download never looks cached.
    """
    local = data_root(root) / entry["filename"]
    if local.is_file():
        return local
    target = Path(cache or cache_dir()) / entry["filename"]
    if target.is_file() and _sha256(target) == entry["sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        got = _download(entry["url"], fd, local)
        if got != entry["sha256"]:
            raise DownloadError(
                f"{entry['url']}: SHA256 {got} does not match the expected {entry['sha256']}; "
                f"the download was discarded (the file changed upstream or was corrupted in transit)"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def sample_pair(
    name: str = "mrus", root: str | os.PathLike | None = None, cache: str | os.PathLike | None = None
) -> Pair:
    """A sample pair from the data root when present, else from the cache, downloading on first use."""
    entries = [e for e in SAMPLES if e["name"] == name]
    if not entries:
        raise ValueError(f"unknown sample {name!r}; available: {sorted({e['name'] for e in SAMPLES})}")
    paths = {e["role"]: fetch(e, root, cache) for e in entries}
    return Pair(
        id=name,
        fixed=paths["fixed"],
        moving=paths["moving"],
        fixed_labels=paths.get("fixed_labels"),
        moving_labels=paths.get("moving_labels"),
        group=name,
    )
