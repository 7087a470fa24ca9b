"""Moved to :mod:`tbc_integrations.budgets` (kept while ``crewai.py`` imports from here)."""

from __future__ import annotations

from tbc_integrations.budgets import contracts_from_mapping, load_budgets, load_prices

__all__ = ["contracts_from_mapping", "load_budgets", "load_prices"]
