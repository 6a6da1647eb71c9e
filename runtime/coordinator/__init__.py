"""The coordinator: membership, orchestration by generations, job state, and its gRPC server.

`server.py` is the network edge; `orchestrator.py` decides what happens to the job; `membership.py`
knows which nodes are alive; `generation.py` is the generation lifecycle; `store.py` persists state.
"""
