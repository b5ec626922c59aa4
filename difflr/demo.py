"""``python -m difflr.demo``: the main job. It lives in `difflr.demos.ablation`."""

from difflr.demos.ablation import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
