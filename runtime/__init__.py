"""hyrun.runtime."""
