"""A griffe extension for the API reference: ``Example:`` sections render as code.

The package's docstrings head their doctests ``Example:`` (pytest runs them with
``--doctest-modules``); griffe's Google parser treats only ``Examples:`` as the
section whose ``>>>`` lines become highlighted code, and the singular as a plain
admonition. This reads the one as the other, for the site only.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class DoctestExamples(Extension):
    """Rename ``Example:`` section headings to ``Examples:`` before parsing."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
