"""tbc-integrations: token budget contracts for multi-agent LLM systems.

Each agent gets a contract (budget, input/output caps, reserve, priority,
confidence threshold, dependencies). Calls reserve before they spend, settle
real usage after, and release on error; spare budget flows to the agents that
need it, never below a donor's reserve and never downhill in priority.

Example:
    >>> from tbc_integrations import BudgetManager, BudgetExceededError
    >>> m = BudgetManager()
    >>> _ = m.register_agent("planner", priority=1, max_tokens=1000)
    >>> _ = m.register_agent("writer", priority=3, max_tokens=500)
    >>> r = m.reserve("writer", input_tokens=400, output_tokens=600)  # borrows 500
    >>> r.loans
    (('planner', 500),)
    >>> m.commit(r, {"input_tokens": 400, "output_tokens": 200})
    0
    >>> m.report()["planner"]
    {'allocated': 900, 'consumed': 0, 'remaining': 900}
"""

from __future__ import annotations

from ._contracts import BudgetContract, Degrade
from ._errors import (
    BudgetExceededError,
    ConfidenceGateError,
    ContractError,
    CostLimitError,
    InvalidTokenCountError,
    InvalidValueError,
    LimitExceededError,
    MissingDependencyError,
    NamespaceLostError,
    PriceNotFoundError,
    ReservationError,
    StoreError,
    StoreUnavailableError,
    TBCError,
    UnknownAgentError,
)
from ._gating import ConfidenceGate
from ._ledger import Ledger, LedgerEntry, Spend
from ._limits import Limit
from ._manager import BudgetManager, Reallocator
from ._pricing import ModelPrice, PriceTable
from ._records import AgentSpend, AgentStatus, LimitStatus, Reservation
from ._usage import Usage
from ._version import __version__

__all__ = [
    "AgentSpend",
    "AgentStatus",
    "BudgetContract",
    "BudgetExceededError",
    "BudgetManager",
    "ConfidenceGate",
    "ConfidenceGateError",
    "ContractError",
    "CostLimitError",
    "Degrade",
    "InvalidTokenCountError",
    "InvalidValueError",
    "Ledger",
    "LedgerEntry",
    "Limit",
    "LimitExceededError",
    "LimitStatus",
    "MissingDependencyError",
    "ModelPrice",
    "NamespaceLostError",
    "PriceNotFoundError",
    "PriceTable",
    "Reallocator",
    "Reservation",
    "ReservationError",
    "Spend",
    "StoreError",
    "StoreUnavailableError",
    "TBCError",
    "UnknownAgentError",
    "Usage",
    "__version__",
]
