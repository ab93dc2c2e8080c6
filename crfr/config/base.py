"""What every config section shares: the strict base class, the strict scalar types and the shared limits."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict

MAX_EPOCHS = 1000
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most tools take 32-bit seeds


def _not_bool(value: Any) -> Any:
    # Lax float parsing stays on because PyYAML reads 1e-3 (no dot) as a string; only booleans are refused.
    if isinstance(value, bool):
        raise ValueError(f"Input should be a valid number, not the boolean {value} (YAML reads yes/no/on/off as "
                         "booleans)")
    return value


# Strict: YAML 1.1 reads yes/no as booleans, and a lax integer would take True as 1.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_bool)]
Bool = Annotated[bool, Strict()]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated, numbers are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


Range = tuple[Float, Float]


def check_range(name: str, value: tuple[float, float]) -> None:
    """Refuse a ``[low, high]`` pair whose low end lies above its high end.

    Raises:
        ValueError: ``low > high``; pydantic reports it as the section's validation error.
    """
    if value[0] > value[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(value)}")
