"""Model -> layer groups: splitters, repeated blocks, Hugging Face models, freezing (no Lightning)."""

__all__: list[str] = []
