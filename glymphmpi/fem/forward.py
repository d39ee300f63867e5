"""Theta-scheme diffusion on the Q1 voxel mesh and its discrete adjoint.

State equation (space: Q1 Galerkin, M mass and K stiffness matrices with
D = 1; time: theta scheme, theta = 1 implicit Euler, 1/2 Crank-Nicolson)::

    A_n = M + theta tau_n D K,   B_n = M - (1 - theta) tau_n D K
    rows of interior nodes:  [A_n c^n]_I = [B_n c^{n-1}]_I
    boundary nodes:           c^n_B = g^n

The Dirichlet rows are eliminated symmetrically: with P_I the interior
indicator and S_n = P_I A_n P_I + P_B (A_n with boundary rows and columns
replaced by the identity, SPD),

    S_n c^n = r^n := P_I (B_n c^{n-1} - A_n g^n) + g^n        (g^n zero on I).

Discrete adjoint (derived for exactly this recursion, not the continuous
PDE): for J(c^1..c^N, g, D) with partial derivatives j^n = dJ/dc^n,

    S_N p^N = j^N,   S_n p^n = j^n + B_{n+1} P_I p^{n+1}   (n = N-1 .. 1)
    dJ/dg^n  (boundary rows) = partial_g R + [p^n - A_n P_I p^n]_B
    dJ/dD    = partial_D R - sum_n tau_n (P_I p^n) . K (theta c^n + (1 - theta) c^{n-1})

(S is symmetric; B and A are symmetric.) Every vector here is a PETSc Vec
distributed like the dofs; numpy arrays hold the owned entries per step.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from glymphmpi.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class TimeGrid:
    """Time steps from the first to the last scan, landing on every scan.

    Attributes:
        t: (N+1,) step times in hours (t[0] = first scan).
        tau: (N+1,) step lengths (tau[0] = 0 unused; tau[n] = t[n] - t[n-1]).
        obs_step: (p,) index n of each scan time (obs_step[0] = 0).
    """

    t: np.ndarray
    tau: np.ndarray
    obs_step: np.ndarray

    @property
    def n_steps(self) -> int:
        return self.t.size - 1

    @classmethod
    def build(cls, times_h, dt_h: float | None, t_end_h: float | None = None, where=None) -> TimeGrid:
        """Steps of at most ``dt_h`` (None: :func:`glymphmpi.fem.auto.auto_dt`) from the first scan to
        ``t_end_h`` (default: the last scan).

        Raises:
            InputError: fewer than 3 scans, times not increasing, or a scan
                after ``t_end_h`` (outside the simulated interval).
        """
        times = np.asarray(times_h, dtype=np.float64)
        if dt_h is None:  # fem.dt_h unset: follows the scans
            from glymphmpi.fem.auto import auto_dt

            dt_h = auto_dt(times) if times.size >= 2 else math.inf
        if times.size < 3:
            raise InputError(f"the FEM method needs at least 3 scans (the first is the initial state), "
                             f"found {times.size}", where)
        if np.any(np.diff(times) <= 0) or not np.all(np.isfinite(times)):
            raise InputError("scan times must be finite and strictly increasing", where)
        if t_end_h is not None:
            outside = times[times > t_end_h + 1e-9]
            if outside.size:
                raise InputError(f"scan time {outside[0]:g} h lies outside the simulated interval "
                                 f"[{times[0]:g}, {t_end_h:g}] h (fem.t_end_h)", where)
            if t_end_h > times[-1] + 1e-9:
                times = np.append(times, t_end_h)
        t = [times[0]]
        obs = [0]
        for a, b in zip(times[:-1], times[1:]):
            n = max(1, int(math.ceil((b - a) / dt_h - 1e-9)))
            t.extend(a + (b - a) * np.arange(1, n + 1) / n)
            t[-1] = b
            obs.append(len(t) - 1)
        t = np.asarray(t)
        tau = np.concatenate([[0.0], np.diff(t)])
        obs = obs[: np.asarray(times_h).size]
        return cls(t=t, tau=tau, obs_step=np.asarray(obs))


def object_prefix(base: str, obj) -> str:
    """A PETSc options prefix of its own for ``obj``: ``base`` + a per-object tag (as DOLFINx does)."""
    return f"{base}{id(obj):x}_"


@contextmanager
def petsc_options(prefix: str, options: dict):
    """Put ``{name: value}`` into the PETSc options database under ``prefix`` for the ``with`` block.

    Call the object's ``setFromOptions()`` inside the block; the entries are
    removed on exit, so nothing is left in the global database and two
    objects never see each other's settings.
    """
    from petsc4py import PETSc

    opts = PETSc.Options()
    names = []
    try:
        for k, v in options.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            opts[f"{prefix}{k}"] = "" if v is None else str(v)
            names.append(f"{prefix}{k}")
        yield prefix
    finally:
        for name in names:
            opts.delValue(name)


class DiffusionModel:
    """Q1 matrices, the theta-scheme forward solve and its adjoint on ``comm``.

    Args:
        vm: the voxel mesh (:class:`glymphmpi.fem.mesh.VoxelMesh`).
        grid: the time grid.
        theta: 1 implicit Euler, 0.5 Crank-Nicolson.
        lumped_mass: use the row-sum lumped mass matrix.
        petsc_prefix, petsc_options: KSP/PC options; each KSP gets the prefix
            ``petsc_prefix`` + a tag of this model, and the options are removed
            from PETSc's database once the KSP has read them.
    """

    def __init__(self, vm, grid: TimeGrid, theta: float = 1.0, lumped_mass: bool = False,
                 petsc_prefix: str = "glymph_fem_", petsc_options: dict | None = None):
        import ufl
        from dolfinx import fem
        from dolfinx.fem.petsc import assemble_matrix
        from petsc4py import PETSc

        self.PETSc = PETSc
        self.vm = vm
        self.comm = vm.mesh.comm
        self.grid = grid
        self.theta = float(theta)
        V = vm.V
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        n = ufl.FacetNormal(vm.mesh)

        def tgrad(w):
            return ufl.grad(w) - ufl.dot(ufl.grad(w), n) * n

        def mat(a):
            A = assemble_matrix(fem.form(a))
            A.assemble()
            return A

        self.K = mat(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
        M = mat(u * v * ufl.dx)
        if lumped_mass:
            diag = M.createVecRight()
            ones = M.createVecRight()
            ones.set(1.0)
            M.mult(ones, diag)
            M = self.K.duplicate(copy=False)  # same pattern, zero values
            M.zeroEntries()
            M.setDiagonal(diag)
            M.assemble()
        self.M = M
        self.Mg = mat(u * v * ufl.ds)
        self.Kg = mat(ufl.inner(tgrad(u), tgrad(v)) * ufl.ds)
        self.lumped = lumped_mass
        start = V.dofmap.index_map.local_range[0]
        nown = vm.n_owned
        self.bidx = np.flatnonzero(vm.owned_boundary).astype(np.int32)  # local owned boundary dofs
        self.bglobal = (self.bidx + start).astype(PETSc.IntType)
        self.nb_local = self.bidx.size
        self.n_owned = nown
        self.pin = self.M.createVecRight()
        arr = np.ones(nown)
        arr[self.bidx] = 0.0
        self.pin.array[:] = arr
        self.prefix = object_prefix(petsc_prefix, self)
        self._options = dict(petsc_options or {})
        self._ops: dict = {}
        self._D: float | None = None
        self.ksp_iterations = 0
        self.solves = 0
        self._w = [self.M.createVecRight() for _ in range(5)]

    # ------------------------------------------------------------ helpers
    def vec(self, arr=None):
        v = self.M.createVecRight()
        if arr is not None:
            v.array[:] = arr
        else:
            v.set(0.0)
        return v

    def embed_boundary(self, gb: np.ndarray, out=None):
        """Vec with ``gb`` (nb_local,) on the owned boundary dofs and zeros inside."""
        out = self.vec() if out is None else out
        out.set(0.0)
        out.array[self.bidx] = gb
        return out

    def set_D(self, D: float) -> None:
        """(Re)build S_n and its KSP for every distinct step length."""
        if self._D == D:
            return
        PETSc = self.PETSc
        for key in {round(float(t), 12) for t in self.grid.tau[1:]}:
            if key in self._ops:
                S, ksp = self._ops[key]
            else:
                S = self.M.duplicate(copy=False)
                ksp = None
            S.zeroEntries()
            S.axpy(1.0, self.M, structure=PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
            S.axpy(self.theta * key * D, self.K, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            S.zeroRowsColumns(self.bglobal, diag=1.0)
            if ksp is None:
                ksp = PETSc.KSP().create(self.comm)
                ksp.setOptionsPrefix(self.prefix)
                ksp.setOperators(S)
                with petsc_options(self.prefix, self._options):
                    ksp.setFromOptions()
                ksp.setInitialGuessNonzero(True)
                self._ops[key] = (S, ksp)
            else:
                ksp.setOperators(S)  # new values: the preconditioner is rebuilt at the next solve
        self._D = float(D)

    def _solve(self, tau: float, rhs, x) -> None:
        ksp = self._ops[round(float(tau), 12)][1]
        ksp.solve(rhs, x)
        reason = ksp.getConvergedReason()
        if reason < 0:
            raise RuntimeError(f"KSP diverged (reason {reason}); adjust fem.petsc_options")
        self.ksp_iterations += ksp.getIterationNumber()
        self.solves += 1

    # ------------------------------------------------------------ forward
    def forward(self, D: float, c0: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Solve the state equation.

        Args:
            D: diffusion coefficient (mm^2/h).
            c0: (n_owned,) initial state (its boundary entries are g^0).
            g: (N+1, nb_local) boundary values per step (g[0] unused: c0 holds it).
        Returns:
            (N+1, n_owned) states c^n.
        """
        self.set_D(D)
        th = self.theta
        N = self.grid.n_steps
        out = np.empty((N + 1, self.n_owned))
        out[0] = c0
        c = self.vec(c0)
        gv, r, w1, w2 = self._w[:4]
        for n in range(1, N + 1):
            tau = self.grid.tau[n]
            self.embed_boundary(g[n], gv)
            # r = P_I (M (c - g) - tau D K ((1-th) c + th g)) + g
            w1.array[:] = c.array - gv.array
            self.M.mult(w1, r)
            w2.array[:] = (1.0 - th) * c.array + th * gv.array
            self.K.mult(w2, w1)
            r.array[:] = self.pin.array * (r.array - tau * D * w1.array) + gv.array
            if n >= 2:  # linear extrapolation as the initial guess
                c.array[:] = 2.0 * out[n - 1] - out[n - 2]
            self._solve(tau, r, c)
            out[n] = c.array
        return out

    # ------------------------------------------------------------ adjoint
    def adjoint(self, D: float, states: np.ndarray, jc: dict) -> tuple[np.ndarray, float]:
        """Adjoint sweep: gradients w.r.t. the boundary values and D.

        Args:
            D: diffusion coefficient used in the forward solve.
            states: (N+1, n_owned) from :meth:`forward`.
            jc: {step n: (n_owned,) dJ/dc^n} (n >= 1; missing steps are zero).
        Returns:
            (dJ/dg (N+1, nb_local) with row 0 zero, dJ/dD) of the state part
            (add the regularisation's partial derivatives).
        """
        self.set_D(D)
        th = self.theta
        N = self.grid.n_steps
        dg = np.zeros((N + 1, self.nb_local))
        dD_local = 0.0
        p = self.vec()
        rhs, pI, w1, w2 = self._w[1:5]
        carry = np.zeros(self.n_owned)  # B_{n+1} P_I p^{n+1}
        p_prev = np.zeros(self.n_owned)
        for n in range(N, 0, -1):
            tau = self.grid.tau[n]
            rhs.array[:] = carry + (jc[n] if n in jc else 0.0)
            p_old = p.array.copy()
            if n < N - 1 and n + 1 not in jc:  # extrapolate where the adjoint is smooth
                p.array[:] = 2.0 * p_old - p_prev
            self._solve(tau, rhs, p)
            p_prev = p_old
            pI.array[:] = self.pin.array * p.array
            # dJ/dg^n = [p - A_n P_I p]_B
            self.M.mult(pI, w1)
            self.K.mult(pI, w2)
            ap = w1.array + th * tau * D * w2.array
            dg[n] = (p.array - ap)[self.bidx]
            # dJ/dD contribution: - tau pI . K (th c^n + (1-th) c^{n-1})  (K symmetric)
            dD_local -= tau * float(np.dot(w2.array, th * states[n] + (1.0 - th) * states[n - 1]))
            # carry for step n-1: B_n P_I p^n = M pI - (1-th) tau D K pI
            if n > 1:
                carry = w1.array - (1.0 - th) * tau * D * w2.array
        from mpi4py import MPI

        dD = self.comm.allreduce(dD_local, op=MPI.SUM)
        return dg, dD

    # ------------------------------------------------------------ products
    def quad(self, A, x: np.ndarray, y: np.ndarray | None = None) -> float:
        """Global x . A y for owned arrays (y = x by default)."""
        xv, yv = self._w[3], self._w[4]
        xv.array[:] = x
        yv.array[:] = x if y is None else y
        A.mult(yv, self._w[2])
        return xv.dot(self._w[2])

    def apply(self, A, x: np.ndarray) -> np.ndarray:
        xv = self._w[3]
        xv.array[:] = x
        A.mult(xv, self._w[2])
        return self._w[2].array.copy()

    def destroy(self) -> None:
        for S, ksp in self._ops.values():
            ksp.destroy()
            S.destroy()
        self._ops.clear()
        for m in (self.M, self.K, self.Mg, self.Kg, self.pin, *self._w):
            m.destroy()
