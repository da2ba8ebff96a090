"""Multi-objective configuration search (AutoPEFT-style) on Optuna: space, pruning, workers, Pareto report."""
from .config import SearchConfig, SearchPlan, load_search  # noqa: F401
