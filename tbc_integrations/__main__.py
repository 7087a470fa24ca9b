"""``python -m tbc_integrations`` runs the ``tbc`` command."""

from __future__ import annotations

from tbc_integrations.cli import entry

entry()
