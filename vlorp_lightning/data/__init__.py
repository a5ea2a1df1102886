"""Datamodules and answer scoring for reasoning fine-tuning.

Each datamodule reads and validates its rows in ``setup`` and yields batches of one
fixed contract: training batches with ``input_ids``, ``attention_mask`` and
``labels``, and lists of evaluation loaders (one per entry of ``eval_tasks``) whose
batches are in ``"generate"`` or ``"choice"`` mode.
"""

from vlorp_lightning.data.answers import extract_number, normalize_number, numbers_match
from vlorp_lightning.data.base import ReasoningDataModule, TaskMode
from vlorp_lightning.data.collate import IGNORE_INDEX
from vlorp_lightning.data.commonsense import COMMONSENSE_TASKS, CommonsenseDataModule
from vlorp_lightning.data.encoding import EncodingStats, Example
from vlorp_lightning.data.gsm8k import GSM8KDataModule
from vlorp_lightning.data.mmlu import MMLUDataModule
from vlorp_lightning.data.mmlu_subjects import MMLU_CATEGORIES, MMLU_SUBJECTS, subject_category
from vlorp_lightning.data.procedural import DEFAULT_PROCEDURAL_TASKS, ProceduralReasoningDataModule

__all__ = [
    "COMMONSENSE_TASKS",
    "CommonsenseDataModule",
    "DEFAULT_PROCEDURAL_TASKS",
    "EncodingStats",
    "Example",
    "GSM8KDataModule",
    "IGNORE_INDEX",
    "MMLUDataModule",
    "MMLU_CATEGORIES",
    "MMLU_SUBJECTS",
    "ProceduralReasoningDataModule",
    "ReasoningDataModule",
    "TaskMode",
    "extract_number",
    "normalize_number",
    "numbers_match",
    "subject_category",
]
