"""ELUE evaluation: per-sample FLOPs and parameters, the ELUE score and Pareto frontier, and an
ElasticBERT-style multi-exit baseline."""
from .flops import (CostReport, count_flops, count_parameters, encoded_flops_per_sample,
                    flop_mapping, per_sample_cost)
from .multi_exit import MultiExitBert, train_multi_exit
from .score import Point, baseline_curve, elue_score, pareto_frontier, plot

__all__ = ["CostReport", "MultiExitBert", "train_multi_exit", "Point", "baseline_curve", "count_flops", "count_parameters",
           "elue_score", "encoded_flops_per_sample", "flop_mapping", "pareto_frontier", "per_sample_cost", "plot"]
