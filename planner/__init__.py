"""hyrun.planner."""
