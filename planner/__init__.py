"""hyrun.planner: a pure library (plain Python and numpy, no torch, no processes) that chooses how a
Mixture-of-Experts job is laid out on mixed cards. Describe the cards (`Cluster`, `CardSpec`), the model
(`ModelShape`) and the batch (`TrainingConfig`); `search` returns the best `Plan`, runner-ups and the
naive plan; `replan` does it again without evicted cards; `calibrate` folds measurements back in.
"""

from .calibrate import calibrate
from .cards import CARD_CATALOGUE, GIB, CardSpec, card_spec
from .cluster import Card, Cluster, cluster_from_job
from .model_cost import ModelShape
from .naive import naive_plan
from .plan import CardMemory, Degrees, Plan, StepTimeTerms
from .report import format_comparison, result_to_json
from .search import SearchResult, replan, search
from .space import DATA_PARALLEL_ONLY, DegreeConstraints
from .training import Precision, TrainingConfig

__all__ = [
    "CARD_CATALOGUE", "DATA_PARALLEL_ONLY", "GIB", "Card", "CardMemory", "CardSpec", "Cluster", "DegreeConstraints",
    "Degrees", "ModelShape", "Plan", "Precision", "SearchResult", "StepTimeTerms", "TrainingConfig", "calibrate",
    "card_spec", "cluster_from_job", "format_comparison", "naive_plan", "replan", "result_to_json", "search",
]
