"""The random parameters of one simulation, and the one place their ranges are defined.

The regularising distribution of Hu et al. (2018, section 2.3) is only as good as the variety
of intra-procedural scenarios it covers, so every quantity that differs between patients or
procedures is sampled here: gland size, probe placement, tissue stiffness and compressibility,
which parts of the pelvis hold the tissue still, and how the TRUS probe and its acoustic
balloon move. Everything downstream (meshing, solving, sampling) is deterministic given a
`SimulationParameters`, which is also what the sidecar JSON of each simulation records.

Frame of the finite-element (FE) model, anatomical, in mm, gland centre at the origin:
x lateral, y anterior -> posterior (the probe lies at +y, behind the gland), z inferior ->
superior (along the probe). `fields.MRUS_ORIENTATION` maps it onto the TRUS images' axes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# All ranges, closed intervals [low, high]; lengths in mm, angles in degrees, moduli in kPa.
RANGES = {
    # Gland ellipsoid semi-axes: diameters 30-50 (lateral) x 25-40 (AP) x 25-40 (SI) mm.
    "gland_semi_axes": ((15.0, 25.0), (12.5, 20.0), (12.5, 20.0)),
    "probe_radius": (9.5, 10.5),  # a ~20 mm TRUS probe
    "probe_gap": (3.0, 6.0),  # rectal wall and fat between the gland and the probe surface
    "probe_lateral_offset": (-3.0, 3.0),
    "probe_pitch_deg": (-8.0, 8.0),  # tilt of the probe axis in the sagittal (y-z) plane
    # Young's modulus, sampled log-uniformly so stiffness ratios are symmetric (gland vs tissue).
    "youngs_modulus_kpa": (5.0, 60.0),
    "poisson_ratio": (0.40, 0.49),
    # Probe motion: an anterior push (-y), small lateral and axial shifts, small rotations
    # about a pivot on the probe axis between the gland and the block's inferior face.
    "probe_push": (2.0, 10.0),
    "probe_lateral_shift": (-2.0, 2.0),
    "probe_axial_shift": (-3.0, 3.0),
    "probe_tilt_deg": (-3.0, 3.0),  # about x and about y (through the pivot)
    "probe_roll_deg": (-5.0, 5.0),  # about the probe's own axis
    # Acoustic balloon: radial inflation over a length of the probe, centred near the gland.
    "balloon_inflation": (0.0, 4.0),
    "balloon_length": (25.0, 45.0),
    "balloon_centre_offset": (-5.0, 5.0),
    # Probability that each optional part of the outer boundary is fixed; the anterior face
    # (pubic bone) always is.
    "p_fixed_lateral": 0.5,  # pelvic side walls, both faces together
    "p_fixed_posterior": 0.5,  # sacrum side
    # Sampling-domain augmentation (section 2.4 of the paper): the TRUS field of view is moved
    # by a random affine about its centre before the field is sampled.
    "domain_rotation_deg": (0.0, 5.0),  # about a random axis
    "domain_scale": (0.9, 1.1),  # per axis
    "domain_shift": (-3.0, 3.0),  # per axis
}

# Half-size of the tissue block per axis, in gland semi-axes. Large enough that the TRUS field
# of view, mapped into the FE frame by matching gland bounding boxes, stays inside the block:
# over the 80 MR-US cases the field of view extends at most 1.12 gland diameters
# beyond the gland's box, i.e. 3.24 semi-axes from the centre; 3.6 leaves room for the
# sampling-domain augmentation.
BLOCK_HALF_SIZE = 3.6

# Target tetrahedron edge length (mm) near the gland and probe surfaces, and far from them:
# 1,200-2,800 nodes (median 1,800) and 6,000-14,000 tetrahedra over 60 scenarios. Measured on a
# shared 2-core machine, one process: meshing 0.6 s, the FE solve 1.7 s, sampling with affine
# removal 1.3 s per field. A 4 mm mesh (2,600-3,200 nodes) changed the gland's volume change by
# at most 0.2 percentage points and its peak displacement by at most 0.1 mm on three scenarios,
# at three times the solve time.
MESH_SIZE = (5.0, 20.0)


@dataclass(frozen=True)
class SimulationParameters:
    """One scenario. Vectors are tuples in the FE frame (see the module docstring)."""

    gland_semi_axes: tuple
    block_half_size: tuple
    probe_radius: float
    probe_axis_point: tuple  # where the probe axis crosses z = 0
    probe_pitch_deg: float
    youngs_modulus_gland: float
    poisson_gland: float
    youngs_modulus_tissue: float
    poisson_tissue: float
    probe_translation: tuple
    probe_rotation_deg: tuple  # rotation vector (x, y, probe axis) in degrees
    probe_pivot_s: float  # pivot position along the probe axis (mm from z = 0)
    balloon_inflation: float
    balloon_length: float
    balloon_centre_s: float
    fixed_lateral: bool
    fixed_posterior: bool
    mesh_size: tuple = MESH_SIZE

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def probe_direction(self) -> np.ndarray:
        """Unit vector of the probe axis, pointing superiorly."""
        a = np.radians(self.probe_pitch_deg)
        return np.array([0.0, np.sin(a), np.cos(a)])


def _uniform(rng: np.random.Generator, name: str) -> float:
    low, high = RANGES[name]
    return float(rng.uniform(low, high))


def sample_parameters(rng: np.random.Generator, mesh_size: tuple = MESH_SIZE) -> SimulationParameters:
    """Draw one scenario from `RANGES` (the same generator state gives the same scenario)."""
    semi = tuple(float(rng.uniform(lo, hi)) for lo, hi in RANGES["gland_semi_axes"])
    radius = _uniform(rng, "probe_radius")
    axis_point = (
        _uniform(rng, "probe_lateral_offset"),
        semi[1] + _uniform(rng, "probe_gap") + radius,
        0.0,
    )
    e_low, e_high = np.log(RANGES["youngs_modulus_kpa"])
    half = tuple(BLOCK_HALF_SIZE * a for a in semi)
    return SimulationParameters(
        gland_semi_axes=semi,
        block_half_size=half,
        probe_radius=radius,
        probe_axis_point=axis_point,
        probe_pitch_deg=_uniform(rng, "probe_pitch_deg"),
        youngs_modulus_gland=float(np.exp(rng.uniform(e_low, e_high))),
        poisson_gland=_uniform(rng, "poisson_ratio"),
        youngs_modulus_tissue=float(np.exp(rng.uniform(e_low, e_high))),
        poisson_tissue=_uniform(rng, "poisson_ratio"),
        probe_translation=(
            _uniform(rng, "probe_lateral_shift"),
            -_uniform(rng, "probe_push"),
            _uniform(rng, "probe_axial_shift"),
        ),
        probe_rotation_deg=(
            _uniform(rng, "probe_tilt_deg"),
            _uniform(rng, "probe_tilt_deg"),
            _uniform(rng, "probe_roll_deg"),
        ),
        probe_pivot_s=float(rng.uniform(-half[2], 0.0)),
        balloon_inflation=_uniform(rng, "balloon_inflation"),
        balloon_length=_uniform(rng, "balloon_length"),
        balloon_centre_s=_uniform(rng, "balloon_centre_offset"),
        fixed_lateral=bool(rng.random() < RANGES["p_fixed_lateral"]),
        fixed_posterior=bool(rng.random() < RANGES["p_fixed_posterior"]),
        mesh_size=tuple(float(s) for s in mesh_size),
    )
