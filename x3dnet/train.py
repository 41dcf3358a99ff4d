"""x3dnet train (placeholder while the loop is written)."""
from .solver import SolverConfig, build_optimizer, lr_at

__all__ = ["SolverConfig", "build_optimizer", "lr_at"]
