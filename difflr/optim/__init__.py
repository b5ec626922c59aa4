"""The optimizer over layer groups: param groups, the fastest implementation, entering a stage,
previews of a plan (no Lightning)."""

__all__: list[str] = []
