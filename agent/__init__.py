"""hyrun.agent."""
