"""The coordinator: no torch, one writer of job state. Messages only update state (`ingest.py`,
`membership.py`, `health.py`, `generation.py`, `records.py`); on a timer `decide.py` reads a frozen
`view.py` and returns typed `actions.py`; `orchestrator.py` applies them; `lifecycle.py` holds the
transition tables; `planning.py` and `ranks.py` turn the planner's plan into ranks; `server.py` is
the gRPC edge; `store.py` / `etcd_store.py` persist state.
"""
