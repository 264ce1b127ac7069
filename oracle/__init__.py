"""oracle: the contiguous-cache, float64 reference that every paged backend is checked against.

It imports nothing from `paged`: its request checks (`oracle.checks`), exceptions (`oracle.errors`) and position
semantics (`oracle.rules`: causal, sliding window, prefix LM, ALiBi, soft cap) are its own.
"""

from oracle.attention import reference_attention
from oracle.cache import ContiguousMemory, ContiguousOracle
from oracle.errors import OracleError
from oracle.rules import ALiBi, Causal, PrefixLM, SlidingWindow, SoftCap

__all__ = ["ALiBi", "Causal", "ContiguousMemory", "ContiguousOracle", "OracleError", "PrefixLM", "SlidingWindow",
           "SoftCap", "reference_attention"]
