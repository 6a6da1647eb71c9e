"""The one owner of the device meshes: `ParallelDims` is the checked degrees (`degrees.ParallelDegrees`)
plus the dense and expert meshes built from them. Mesh dimensions are `pp`, `dp`, `cp`, `tp`; the expert
mesh is (`pp`, `edp`, `ep`, `tp`) over the same ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hyrun.runtime.parallel.degrees import EXPERT_MESH_DIMS, MESH_DIMS, ParallelDegrees


@dataclass(frozen=True)
class ParallelDims(ParallelDegrees):
    """The checked degrees and the meshes built from them (every rank builds the same, in the same order)."""

    # --- meshes ------------------------------------------------------------------------------------

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The dense mesh (pp, dp, cp, tp), with dp × cp flattened as `dp_cp` for FSDP.

        Collective: every rank calls it, in the same order as every other mesh it builds.
        """
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=MESH_DIMS)
        mesh["dp", "cp"]._flatten("dp_cp")
        return mesh

    def build_expert_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The expert mesh (pp, edp, ep, tp) over the same ranks: ep splits off the fast end of dp × cp."""
        return init_device_mesh(device_type, (self.pp, self.edp, self.ep, self.tp),
                                mesh_dim_names=EXPERT_MESH_DIMS)
