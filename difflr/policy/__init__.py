"""Pure values and functions: LR specs, schedules, stages and plans, freeze counts, suggestions
(no Lightning, no model)."""

__all__: list[str] = []
