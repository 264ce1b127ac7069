"""oracle: the contiguous-cache, float64 reference that every paged backend is checked against."""

from oracle.attention import reference_attention
from oracle.cache import ContiguousOracle

__all__ = ["ContiguousOracle", "reference_attention"]
