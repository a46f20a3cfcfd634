"""Nonlinear (compressible neo-Hookean) finite-element solve with scikit-fem.

Strain energy per undeformed volume (the compressible neo-Hookean of Bonet and Wood):

    W(F) = mu/2 (tr(F^T F) - 3) - mu ln J + lambda/2 (ln J)^2,    J = det F,

so that the first Piola-Kirchhoff stress and its directional derivative (the consistent tangent
that gives Newton quadratic convergence) are

    P = mu (F - F^-T) + lambda ln J F^-T,
    dP[G] = mu G + (mu - lambda ln J) F^-T G^T F^-T + lambda tr(F^-1 G) F^-T.

The ln J term makes W infinite as an element collapses, so a converged solution has J > 0 in
every element. Gland and surrounding tissue have their own (mu, lambda), from the sampled
Young's modulus and Poisson ratio. Units are mm and kPa; with displacement-only loading the
solution depends on the moduli only through their ratio, so kPa is a label, not a scale.

Loading is purely kinematic: every node of the probe region follows the probe's rigid motion
plus the balloon's inflation, the fixed parts of the box are held at zero, the rest of the box
surface is traction free. The prescribed displacement is applied in load steps; each step is
a predictor (the tangent system solved for the new boundary values) followed by Newton
corrections with a backtracking line search that never accepts an inverted element. A step
that fails is halved; below `MIN_STEP` the simulation is reported as `NotConverged`.

Linear tetrahedra (P1): cheap enough for thousands of simulations, and their piecewise-affine
deformation is exactly invertible, which `fields.py` relies on. Their known drawback is
volumetric locking as Poisson's ratio approaches 0.5 (too stiff in compression); with ratios
up to 0.49 it reduces volume change, it does not break the solution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import splu
from scipy.spatial.transform import Rotation
from skfem import (
    Basis,
    BilinearForm,
    ElementTetP1,
    ElementVector,
    LinearForm,
    MeshTet,
    condense,
)
from skfem.helpers import ddot, grad

from .mesh import GLAND, PROBE, TissueMesh
from .params import SimulationParameters

FIRST_STEP = 1.0  # the whole load at once: 4-5 Newton iterations in most scenarios; halved on failure
MIN_STEP = 1.0 / 64
MAX_NEWTON = 12
FORCE_TOLERANCE = 1e-8  # Newton stops when no free node carries more than this fraction of the largest reaction


class NotConverged(RuntimeError):
    """The Newton iterations failed even with the smallest load step."""


@dataclass(frozen=True)
class Solution:
    """Nodal displacement `[N, 3]` (mm, FE frame) of `mesh` and how the solve went."""

    mesh: TissueMesh
    displacement: np.ndarray
    steps: int
    newton_iterations: int

    @property
    def element_jacobians(self) -> np.ndarray:
        """det F of every tetrahedron (deformed over undeformed volume)."""
        return self.mesh.volumes(self.displacement) / self.mesh.volumes()

    def volume_change(self, region: int = GLAND) -> float:
        """Relative volume change of a region, (V - V0) / V0."""
        keep = self.mesh.region == region
        return float(self.mesh.volumes(self.displacement)[keep].sum() / self.mesh.volumes()[keep].sum() - 1)


def lame(youngs_modulus: float, poisson: float) -> tuple[float, float]:
    """(mu, lambda) from Young's modulus and Poisson's ratio."""
    mu = youngs_modulus / (2 * (1 + poisson))
    lam = youngs_modulus * poisson / ((1 + poisson) * (1 - 2 * poisson))
    return mu, lam


def probe_displacement(points: np.ndarray, params: SimulationParameters) -> np.ndarray:
    """Prescribed displacement `[n, 3]` of probe-region points `[n, 3]`: inflation, then rigid motion.

    The balloon inflates the probe radially by `balloon_inflation` mm at its surface, with a
    cos^2 profile over `balloon_length` along the axis, scaled linearly with the distance from
    the axis inside the probe so that the map stays smooth and invertible. The rigid motion
    rotates about a pivot on the probe axis and then translates.
    """
    d = params.probe_direction
    a = np.asarray(params.probe_axis_point)
    rel = points - a
    s = rel @ d
    radial = rel - s[:, None] * d
    t = (s - params.balloon_centre_s) / params.balloon_length
    profile = np.where(np.abs(t) < 0.5, np.cos(np.pi * t) ** 2, 0.0)
    inflated = points + (params.balloon_inflation * profile / params.probe_radius)[:, None] * radial
    rx, ry, roll = np.radians(params.probe_rotation_deg)
    rotation = Rotation.from_rotvec(rx * np.array([1.0, 0, 0]) + ry * np.array([0, 1.0, 0]) + roll * d)
    pivot = a + params.probe_pivot_s * d
    moved = rotation.apply(inflated - pivot) + pivot + np.asarray(params.probe_translation)
    return moved - points


def boundary_conditions(mesh: TissueMesh, params: SimulationParameters) -> tuple[np.ndarray, np.ndarray]:
    """Nodes with prescribed displacement and their values `[n, 3]` at full load.

    Fixed (zero): the anterior face (pubic bone), and when sampled the two lateral faces
    (pelvic side walls) and the posterior face (sacrum). Probe region: `probe_displacement`,
    which wins where the probe meets a fixed face.
    """
    x, h = mesh.nodes, np.asarray(params.block_half_size)
    tol = 1e-6 * h.max()
    fixed = np.abs(x[:, 1] + h[1]) < tol
    if params.fixed_lateral:
        fixed |= np.abs(np.abs(x[:, 0]) - h[0]) < tol
    if params.fixed_posterior:
        fixed |= np.abs(x[:, 1] - h[1]) < tol
    values = np.zeros_like(x)
    probe = mesh.region_nodes(PROBE)
    values[probe] = probe_displacement(x[probe], params)
    fixed[probe] = True
    nodes = np.flatnonzero(fixed)
    return nodes, values[nodes]


# Forms: F-dependent quantities are computed once per assembly (`_Problem._kinematics`) and
# passed in as fields, so the work per pair of basis functions is one contraction.
@LinearForm
def _residual(v, w):
    return ddot(w["stress"], grad(v))


@BilinearForm
def _tangent(du, v, w):
    # dP[G] : grad v with the tangent as a [9, 9, elements, points] matrix C: one einsum per pair.
    c = w["tangent"]
    return np.einsum("ab...,b...,a...->...", c, grad(du).reshape(c.shape[1:]), grad(v).reshape(c.shape[1:]))


class _Problem:
    """The discrete problem: scikit-fem basis, element materials, prescribed DOFs."""

    def __init__(self, mesh: TissueMesh, params: SimulationParameters):
        self.mesh = mesh
        skmesh = MeshTet(np.ascontiguousarray(mesh.nodes.T), np.ascontiguousarray(mesh.tets.T))
        self.basis = Basis(skmesh, ElementVector(ElementTetP1()), intorder=1)  # P1: gradients are constant
        gland = (mesh.region == GLAND)[:, None]
        mu_g, lam_g = lame(params.youngs_modulus_gland, params.poisson_gland)
        mu_t, lam_t = lame(params.youngs_modulus_tissue, params.poisson_tissue)
        self.mu = np.where(gland, mu_g, mu_t)
        self.lam = np.where(gland, lam_g, lam_t)
        nodes, values = boundary_conditions(mesh, params)
        dofs = self.basis.nodal_dofs  # [3, N]
        self.fixed_dofs = dofs[:, nodes].T.ravel()
        self.fixed_values = values.ravel()

    def solve(self, stiffness, rhs: np.ndarray, prescribed: np.ndarray | None = None) -> np.ndarray:
        """Increment with the given values on the prescribed DOFs (zero by default).

        SuperLU in symmetric mode with a minimum-degree ordering of K + K^T: about twice as
        fast as scipy's default for these symmetric stiffness matrices.
        """
        x = np.zeros_like(rhs) if prescribed is None else prescribed
        matrix, b, x, free = condense(stiffness, rhs, x=x, D=self.fixed_dofs)
        lu = splu(matrix.tocsc(), permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})
        x = x.copy()
        x[free] = lu.solve(b)
        return x

    def balanced(self, residual: np.ndarray) -> bool:
        """Out-of-balance forces at the free DOFs below `FORCE_TOLERANCE` of the largest reaction."""
        free = np.ones(len(residual), dtype=bool)
        free[self.fixed_dofs] = False
        return np.abs(residual[free]).max() <= FORCE_TOLERANCE * np.abs(residual[~free]).max()

    def nodal(self, u: np.ndarray) -> np.ndarray:
        """DOF vector -> `[N, 3]`."""
        return u[self.basis.nodal_dofs].T

    def min_jacobian(self, u: np.ndarray) -> float:
        return float((self.mesh.volumes(self.nodal(u)) / self.mesh.volumes()).min())

    def _kinematics(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """F, F^-T and ln J at the quadrature points, `[3, 3, elements, points]` (ln J without the 3, 3)."""
        f = grad(self.basis.interpolate(u)) + np.eye(3)[:, :, None, None]
        f_last = np.moveaxis(f, (0, 1), (-2, -1))
        finv_t = np.moveaxis(np.linalg.inv(f_last), (-2, -1), (1, 0))
        return f, finv_t, np.log(np.linalg.det(f_last))

    def residual(self, u: np.ndarray) -> np.ndarray:
        """Out-of-balance nodal forces, the derivative of the strain energy (mN with kPa and mm)."""
        f, finv_t, log_j = self._kinematics(u)
        stress = self.mu * (f - finv_t) + self.lam * log_j * finv_t
        return _residual.assemble(self.basis, stress=stress)

    def tangent(self, u: np.ndarray):
        """The consistent tangent stiffness (sparse, symmetric)."""
        _, finv_t, log_j = self._kinematics(u)
        eye = np.eye(3)
        c = (
            self.mu * np.einsum("ik,jl->ijkl", eye, eye)[..., None, None]
            + (self.mu - self.lam * log_j) * np.einsum("il...,kj...->ijkl...", finv_t, finv_t)
            + self.lam * np.einsum("ij...,kl...->ijkl...", finv_t, finv_t)
        )
        return _tangent.assemble(self.basis, tangent=c.reshape(9, 9, *c.shape[4:]))


def solve_model(mesh: TissueMesh, params: SimulationParameters) -> Solution:
    """Displacement of `mesh` under the sampled boundary conditions (raises `NotConverged`)."""
    problem = _Problem(mesh, params)
    u = np.zeros(problem.basis.N)
    done, step, steps, iterations = 0.0, FIRST_STEP, 0, 0
    while done < 1.0:
        target = min(1.0, done + step)
        trial, used = _load_step(problem, u, target)
        iterations += used
        if trial is None:
            step /= 2
            if step < MIN_STEP:
                raise NotConverged(f"no convergence at load {done:.3f} even with steps of {MIN_STEP:.4f}")
            continue
        u, done, steps = trial, target, steps + 1
        step *= 2
    return Solution(mesh, problem.nodal(u), steps, iterations)


def _load_step(problem: _Problem, u: np.ndarray, target: float) -> tuple[np.ndarray | None, int]:
    """Newton from `u` to equilibrium at load factor `target`; (None, iterations) when it fails."""
    increment = np.zeros_like(u)
    increment[problem.fixed_dofs] = target * problem.fixed_values - u[problem.fixed_dofs]
    u = u + problem.solve(problem.tangent(u), -problem.residual(u), increment)
    if problem.min_jacobian(u) <= 0:
        return None, 1
    for iteration in range(1, MAX_NEWTON + 1):
        residual = problem.residual(u)
        if problem.balanced(residual):
            return u, iteration
        du = problem.solve(problem.tangent(u), -residual)
        alpha = 1.0
        while problem.min_jacobian(u + alpha * du) <= 0:
            alpha /= 2
            if alpha < 1e-3:
                return None, iteration
        u = u + alpha * du
    return None, MAX_NEWTON
