"""The lowest floor: argument checks (one error vocabulary), files, display, nested structures."""

__all__: list[str] = []
