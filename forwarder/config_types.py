"""Building blocks shared by every config model (kept apart to avoid import cycles)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.\-]+$")]
Identifier = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z_][a-z0-9_]*$")]


class Section(BaseModel):
    """A config table: unknown keys are errors, values never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)
