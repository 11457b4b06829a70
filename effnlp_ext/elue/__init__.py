"""ELUE evaluation: per-sample FLOPs and parameters, the ELUE score and Pareto frontier, and an
ElasticBERT-style multi-exit baseline."""
from .flops import CostReport, count_flops, count_parameters, flop_mapping, per_sample_cost

__all__ = ["CostReport", "count_flops", "count_parameters", "flop_mapping", "per_sample_cost"]
