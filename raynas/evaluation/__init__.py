"""Downstream evaluation (pure Python, no Ray): GLUE and SQuAD data, metrics and scoring.

``tasks`` knows where each task's data lives and loads any split into one schema;
``metrics`` scores GLUE predictions with numpy alone; ``squad_metrics`` is the
official SQuAD v1.1 / v2.0 scoring. ``datasets`` is imported only when a split loads.
"""

from raynas.evaluation.metrics import (
    accuracy,
    average_ranks,
    binary_f1,
    glue_metrics,
    matthews_corrcoef,
    pearson,
    primary_metric,
    spearman,
)
from raynas.evaluation.squad_metrics import (
    exact_match,
    find_best_thresh,
    gold_answers,
    normalize_answer,
    squad_v1_scores,
    squad_v1_scores_from_gold,
    squad_v2_scores,
    squad_v2_scores_from_gold,
    token_f1,
    token_f1_v2,
)
from raynas.evaluation.tasks import (
    GLUE_TASKS,
    TASKS,
    Task,
    TsvLayout,
    canonical_task,
    get_task,
    load_squad_articles,
    load_task_split,
    read_glue_tsv,
    squad_dataset,
    task_file,
)

__all__ = [
    "GLUE_TASKS", "TASKS", "Task", "TsvLayout", "accuracy", "average_ranks", "binary_f1", "canonical_task",
    "exact_match", "find_best_thresh", "get_task", "glue_metrics", "gold_answers", "load_squad_articles",
    "load_task_split", "matthews_corrcoef", "normalize_answer", "pearson", "primary_metric", "read_glue_tsv",
    "spearman", "squad_dataset", "squad_v1_scores", "squad_v1_scores_from_gold", "squad_v2_scores",
    "squad_v2_scores_from_gold", "task_file", "token_f1", "token_f1_v2",
]
