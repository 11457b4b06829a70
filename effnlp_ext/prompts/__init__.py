"""Prompt tuning with cross-task (similarity-guided initialisation) and cross-model (projector)
transfer."""
from .modules import PromptedClassifier, SoftPrompt, insert_prompt
from .projector import ProjectedPrompt, PromptProjector
from .similarity import (activated_neurons, cosine, most_similar, on_similarity,
                         similarity_matrix, token_cosine)
from .transfer import (PromptConfig, evaluate_prompt, load_frozen, steps_to_reach, task_splits,
                       train_prompt, transfer_init, truncate)

__all__ = ["PromptConfig", "PromptProjector", "ProjectedPrompt", "PromptedClassifier",
           "SoftPrompt", "activated_neurons", "cosine", "evaluate_prompt", "insert_prompt",
           "load_frozen", "most_similar", "on_similarity", "similarity_matrix",
           "steps_to_reach", "task_splits", "token_cosine", "train_prompt", "transfer_init", "truncate"]
