"""Gradient projection memory (GPM): a growing orthonormal basis of old inputs and the projection onto its complement.

One :class:`InputBasis` per input space (a LoRA A's layer input, a LoRA B's r-dim
intermediate, or a prompt's embedding space). It acts on the last axis of whatever it
is given, so the same piece serves LoRA factors, full linear weights and prompt/prefix
parameters: ``project_out(g)`` returns ``g - (g U) U^T``, which leaves ``g · x_old`` at
zero for every stored direction.
"""
from __future__ import annotations

import torch


class InputBasis:
    """Orthonormal columns U (d x k) spanning the inputs seen on earlier tasks, up to an energy threshold."""

    def __init__(self, dim: int) -> None:
        self.basis = torch.zeros(dim, 0, dtype=torch.float64)

    @property
    def size(self) -> int:
        return self.basis.shape[1]

    def extend(self, covariance: torch.Tensor, threshold: float) -> int:
        """Add the top directions of a task's input covariance (sum of x x^T) not yet covered; returns how many.

        GPM's criterion: the energy already captured by U plus that of the new residual
        directions must reach ``threshold`` of the task's total energy. Building from the
        d x d covariance (not a PCA of token features) keeps the basis on the input axis.
        """
        covariance = covariance.to(torch.float64)
        total = torch.trace(covariance)
        if total <= 0:
            return 0
        self.basis = self.basis.to(covariance.device)  # the basis lives where the layer inputs are
        complement = torch.eye(covariance.shape[0], dtype=torch.float64, device=covariance.device) - self.basis @ self.basis.T
        residual = complement @ covariance @ complement
        captured = total - torch.trace(residual)
        eigenvalues, eigenvectors = torch.linalg.eigh(residual)
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        reached = (captured + eigenvalues.cumsum(0)) >= threshold * total
        keep = 0 if captured >= threshold * total else int(reached.int().argmax()) + 1 if reached.any() else len(eigenvalues)
        keep = min(keep, covariance.shape[0] - self.size)
        if keep:
            combined = torch.cat([self.basis, eigenvectors[:, :keep]], dim=1)
            self.basis = torch.linalg.qr(combined).Q.contiguous()  # one memory layout, so a restored basis multiplies bit-identically
        return keep

    def project_out(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix - (matrix U) U^T`` along the last axis (the input-facing side)."""
        if not self.size:
            return matrix
        basis = self.basis.to(matrix.device, matrix.dtype)
        return matrix - (matrix @ basis) @ basis.T
