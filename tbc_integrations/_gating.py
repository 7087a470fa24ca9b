"""Confidence gating: once a result is confident enough, further spend is refused.

The ledger applies the gate atomically inside ``reserve``; this module keeps the
rule itself, in the ``tbcontracts`` form.

Example:
    >>> from tbc_integrations import BudgetContract, ConfidenceGate
    >>> c = BudgetContract("critic", confidence_threshold=0.8)
    >>> ConfidenceGate.allow_further_retrieval(c, 0.9)
    False
    >>> ConfidenceGate.allow_further_retrieval(c, None)
    True
"""

from __future__ import annotations

from ._contracts import BudgetContract

__all__ = ["ConfidenceGate"]


class ConfidenceGate:
    """The fixed-threshold gate: open until the last confidence reaches the threshold."""

    @staticmethod
    def is_gated(threshold: float | None, confidence: float | None) -> bool:
        """True when ``confidence`` is at or above ``threshold`` (no threshold: never).

        Example:
            >>> ConfidenceGate.is_gated(0.5, 0.5)
            True
        """
        return threshold is not None and confidence is not None and confidence >= threshold

    @staticmethod
    def allow_further_retrieval(contract: BudgetContract, confidence: float | None) -> bool:
        """True while ``contract``'s agent may keep spending given its last ``confidence``."""
        return not ConfidenceGate.is_gated(contract.confidence_threshold, confidence)
