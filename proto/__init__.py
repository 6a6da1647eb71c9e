"""hyrun.proto."""
