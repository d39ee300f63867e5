"""Voxel mask -> hexahedral mesh whose vertices are voxel centres.

Choice (documented in the README of the method): a hexahedron joins eight
voxel centres (i..i+1, j..j+1, k..k+1) and exists wherever all eight voxels
are inside the mask. Mesh nodes are therefore voxels, Q1 degrees of freedom
coincide with voxel centres and data transfer is exact nodal sampling (no
interpolation error, no "nearest valid voxel" needed). Mask voxels that are
not a corner of any full cell (one-voxel-thin spurs) are not meshed; they
receive the value of the nearest meshed voxel in the output maps.

The domain is thus the mask shrunk by half a voxel: its boundary passes
through the centres of the outermost voxels, which is where the synthetic
phantom imposes its Dirichlet data (its boundary voxels are the mask voxels
with a 6-neighbour outside). A node lies on the mesh boundary iff one of its
eight surrounding cells is missing; this set contains every such phantom
boundary voxel that is meshed, plus voxels with only an edge- or
corner-neighbour outside.

The cells are built on rank 0 and partitioned across ``comm`` by DOLFINx's
graph partitioner (balanced on the masked cells, not on a bounding box).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from glymphmpi.errors import InputError

log = logging.getLogger(__name__)

# DOLFINx hexahedron vertex order: tensor-product (lexicographic, first axis fastest)
_HEX_CORNERS = np.array([(a, b, c) for c in (0, 1) for b in (0, 1) for a in (0, 1)], dtype=np.int64)


def voxel_cells(mask: np.ndarray) -> np.ndarray:
    """(ni-1, nj-1, nk-1) bool: cell (i, j, k) has all eight corner voxels in the mask."""
    m = np.asarray(mask, dtype=bool)
    cells = np.ones(tuple(s - 1 for s in m.shape), dtype=bool)
    for a, b, c in _HEX_CORNERS:
        cells &= m[a:a + cells.shape[0], b:b + cells.shape[1], c:c + cells.shape[2]]
    return cells


def node_classes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, boundary) voxel masks of the hexahedral mesh.

    Returns:
        nodes: (ni, nj, nk) bool, voxels that are a corner of at least one cell.
        boundary: (ni, nj, nk) bool, nodes on the mesh boundary (fewer than 8
            incident cells; equivalent to lying on an exterior facet).
    """
    cells = voxel_cells(mask)
    count = np.zeros(mask.shape, dtype=np.int8)
    n0, n1, n2 = cells.shape
    for a, b, c in _HEX_CORNERS:
        count[a:a + n0, b:b + n1, c:c + n2] += cells
    nodes = count > 0
    return nodes, nodes & (count < 8)


@dataclass
class VoxelMesh:
    """A DOLFINx Q1 space on the voxel-centre hexahedral mesh and its voxel maps.

    Attributes:
        mesh: dolfinx.mesh.Mesh (distributed over ``comm``).
        V: Q1 FunctionSpace.
        n_owned: number of dofs owned by this rank (they come first locally).
        dof_voxel: (n_local,) flat voxel index of each local dof (owned + ghost).
        dof_boundary: (n_local,) bool, dof on the mesh boundary.
        shape: (ni, nj, nk) voxel grid shape.
        nodes: (ni, nj, nk) bool, meshed voxels (same on all ranks).
        n_cells, n_nodes, n_boundary: global counts.
        unmeshed: mask voxels without a node.
    """

    mesh: object
    V: object
    n_owned: int
    dof_voxel: np.ndarray
    dof_boundary: np.ndarray
    shape: tuple
    nodes: np.ndarray
    n_cells: int
    n_nodes: int
    n_boundary: int
    unmeshed: int

    @property
    def owned_voxel(self) -> np.ndarray:
        return self.dof_voxel[: self.n_owned]

    @property
    def owned_boundary(self) -> np.ndarray:
        return self.dof_boundary[: self.n_owned]


def build_mesh(mask: np.ndarray, affine: np.ndarray, comm, where=None) -> VoxelMesh:
    """Build the voxel-centre hexahedral mesh of ``mask`` in world mm on ``comm``.

    Args:
        mask: (ni, nj, nk) bool domain (identical on all ranks).
        affine: (4, 4) voxel index -> world mm.
        comm: MPI communicator.
        where: file named in errors (the subject's mask).
    Raises:
        InputError: the mask is too thin to carry a hexahedron or has no
            interior node.
    """
    import ufl
    from dolfinx import fem
    from dolfinx import mesh as dmesh

    mask = np.asarray(mask, dtype=bool)
    cells_vox = voxel_cells(mask)
    nodes, boundary = node_classes(mask)
    n_cells = int(cells_vox.sum())
    if n_cells == 0:
        raise InputError("mask is too thin to mesh: no 2x2x2 block of voxels lies inside it", where)
    n_interior = int((nodes & ~boundary).sum())
    if n_interior == 0:
        raise InputError("mask is too thin to mesh: the hexahedral mesh has no interior node", where)
    if comm.rank == 0:
        num = -np.ones(mask.size, dtype=np.int64)
        node_flat = np.flatnonzero(nodes)
        num[node_flat] = np.arange(node_flat.size)
        ijk = np.argwhere(cells_vox)  # (n_cells, 3) lower corner
        corners = ijk[:, None, :] + _HEX_CORNERS[None, :, :]  # (n_cells, 8, 3)
        flat = np.ravel_multi_index(tuple(corners.reshape(-1, 3).T), mask.shape)
        cells = num[flat].reshape(-1, 8)
        vox = np.array(np.unravel_index(node_flat, mask.shape), dtype=np.float64).T
        x = vox @ affine[:3, :3].T + affine[:3, 3]
    else:
        cells = np.zeros((0, 8), dtype=np.int64)
        x = np.zeros((0, 3), dtype=np.float64)
    domain = ufl.Mesh(ufl.VectorElement("Lagrange", ufl.hexahedron, 1))
    msh = dmesh.create_mesh(comm, cells, x, domain)
    V = fem.FunctionSpace(msh, ("Q", 1))
    imap = V.dofmap.index_map
    n_owned = imap.size_local
    coords = V.tabulate_dof_coordinates()[:, :3]
    ijk = np.rint((coords - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(np.int64)
    dof_voxel = np.ravel_multi_index(tuple(ijk.T), mask.shape)
    if not np.all(nodes.ravel()[dof_voxel]):  # pragma: no cover - a broken invariant
        raise RuntimeError("a mesh node does not sit on a meshed voxel centre")
    vm = VoxelMesh(mesh=msh, V=V, n_owned=n_owned, dof_voxel=dof_voxel,
                   dof_boundary=boundary.ravel()[dof_voxel], shape=mask.shape, nodes=nodes,
                   n_cells=n_cells, n_nodes=int(nodes.sum()), n_boundary=int(boundary.sum()),
                   unmeshed=int((mask & ~nodes).sum()))
    if imap.size_global != vm.n_nodes:  # pragma: no cover
        raise RuntimeError(f"mesh has {imap.size_global} dofs, expected {vm.n_nodes}")
    log.info("mesh: %d hexahedra, %d nodes (%d on the boundary), %d mask voxels not meshed",
             vm.n_cells, vm.n_nodes, vm.n_boundary, vm.unmeshed)
    return vm
