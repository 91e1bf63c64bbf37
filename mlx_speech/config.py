"""What every part's config dataclass shares: building it from a dictionary."""

from __future__ import annotations

from dataclasses import fields
from typing import Self


class FromDict:
    """Mixin for a config dataclass: ``from_dict`` takes the keys it knows and ignores the rest.

    The same dictionaries carry other parts' keys (a params.json section, our config.json
    section), so unknown keys are not an error; missing ones keep the dataclass defaults.
    """

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
