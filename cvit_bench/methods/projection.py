"""Gradient projection memory (GPM): a growing orthonormal basis of old inputs and the projection onto its complement.

One :class:`InputBasis` per input space (a LoRA A's layer input, a LoRA B's r-dim
intermediate, or a prompt's embedding space). It acts on the last axis of whatever it
is given, so the same piece serves LoRA factors, full linear weights and prompt/prefix
parameters: ``project_out(g)`` returns ``g - (g U) U^T``, which leaves ``g · x_old`` at
zero for every stored direction.

How many directions a task adds is decided on the eigen-spectrum of its input covariance
C = Σ x xᵀ, under one of two energy rules:

- ``squared`` (PEGP's released code): the SVD is taken of C itself, so a direction's
  energy is λ², the square of its eigenvalue of C; on later tasks the residual is
  (I − UUᵀ)C, whose squared singular values are the eigenvalues of (I − UUᵀ)C²(I − UUᵀ).
- ``eigenvalue`` (GPM as published): the SVD is taken of the token matrix, so a
  direction's energy is λ.

Both codes count alike: on a basis's first task they keep the directions whose cumulative
share of the energy stays strictly below the threshold; on later tasks they add residual
directions until the share already captured plus the added one reaches it.
"""
from __future__ import annotations

import torch

ENERGY_RULES = ("squared", "eigenvalue")


class InputBasis:
    """Orthonormal columns U (d x k, float32) spanning the inputs seen on earlier tasks, up to an energy threshold."""

    def __init__(self, dim: int) -> None:
        self.basis = torch.zeros(dim, 0)
        self.tasks = 0  # extensions so far: the first one counts directions differently

    @property
    def size(self) -> int:
        return self.basis.shape[1]

    def extend(self, covariance: torch.Tensor, threshold: float, energy: str = "squared") -> int:
        """Add the top directions of a task's input covariance (sum of x x^T) not yet covered; returns how many.

        Building from the d x d covariance (not a PCA of token features, as PEGP's code
        does) keeps the basis on the input axis. The covariance is scaled to unit trace
        first: the rules compare shares, and λ² of a raw activation covariance can leave
        float32's range.
        """
        if energy not in ENERGY_RULES:
            raise ValueError(f"energy must be one of {ENERGY_RULES}, not {energy!r}")
        first = self.tasks == 0
        self.tasks += 1
        covariance = covariance.to(torch.float32)
        scale = torch.trace(covariance)
        if not scale > 0:
            return 0
        matrix = covariance / scale
        if energy == "squared":
            matrix = matrix @ matrix
        total = torch.trace(matrix)
        self.basis = self.basis.to(covariance.device)  # the basis lives where the layer inputs are
        residual = matrix
        if self.size:
            complement = torch.eye(matrix.shape[0], device=matrix.device) - self.basis @ self.basis.T
            residual = complement @ matrix @ complement
        captured = total - torch.trace(residual)
        eigenvalues, eigenvectors = torch.linalg.eigh(residual)
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        below = int(((captured + eigenvalues.cumsum(0)) < threshold * total).sum())
        if first:
            keep = below
        else:
            keep = 0 if captured >= threshold * total else below + 1  # the direction that reaches the threshold is kept
        keep = min(keep, matrix.shape[0] - self.size)
        if keep:
            combined = torch.cat([self.basis, eigenvectors[:, :keep]], dim=1)
            self.basis = torch.linalg.qr(combined).Q.contiguous()  # one memory layout, so a restored basis multiplies bit-identically
        return keep

    def project_out(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix - (matrix U) U^T`` along the last axis (the input-facing side), computed in float32."""
        if not self.size:
            return matrix
        work = matrix.to(torch.float32)
        basis = self.basis.to(matrix.device)
        return (work - (work @ basis) @ basis.T).to(matrix.dtype)
