"""The 57 MMLU subjects and their categories (Hendrycks et al., ICLR 2021, arXiv:2009.03300).

The grouping is the standard four-category one used to report MMLU by category:
18 STEM, 13 humanities, 12 social sciences and 14 other subjects. In it anatomy,
clinical knowledge and the medicine subjects count as "other" (health), not STEM.
"""

from __future__ import annotations

from vlorp_lightning.data.records import unknown_name_message

__all__ = ["MMLU_CATEGORIES", "MMLU_SUBJECTS", "subject_category"]

MMLU_CATEGORIES: tuple[str, ...] = ("STEM", "humanities", "social sciences", "other")
"""Category names, where "other" means "other (business, health, misc.)"."""

_STEM = (
    "abstract_algebra",
    "astronomy",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "electrical_engineering",
    "elementary_mathematics",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_statistics",
    "machine_learning",
)
_HUMANITIES = (
    "formal_logic",
    "high_school_european_history",
    "high_school_us_history",
    "high_school_world_history",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "moral_disputes",
    "moral_scenarios",
    "philosophy",
    "prehistory",
    "professional_law",
    "world_religions",
)
_SOCIAL_SCIENCES = (
    "econometrics",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_microeconomics",
    "high_school_psychology",
    "human_sexuality",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
)
_OTHER = (
    "anatomy",
    "business_ethics",
    "clinical_knowledge",
    "college_medicine",
    "global_facts",
    "human_aging",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "nutrition",
    "professional_accounting",
    "professional_medicine",
    "virology",
)

MMLU_SUBJECTS: dict[str, str] = dict(
    sorted(
        [(name, "STEM") for name in _STEM]
        + [(name, "humanities") for name in _HUMANITIES]
        + [(name, "social sciences") for name in _SOCIAL_SCIENCES]
        + [(name, "other") for name in _OTHER]
    )
)
"""Subject name (as in the MMLU file names) mapped to its category, sorted by name."""


def subject_category(subject: str) -> str:
    """Return the category of an MMLU subject: STEM, humanities, social sciences or other.

    Raises:
        ValueError: for an unknown subject, with close matches in the message.

    Example:
        >>> subject_category("college_physics")
        'STEM'
    """
    if subject not in MMLU_SUBJECTS:
        raise ValueError(
            unknown_name_message(
                "MMLU", "subject", subject, list(MMLU_SUBJECTS), "vlorp_lightning.data.mmlu_subjects.MMLU_SUBJECTS"
            )
        )
    return MMLU_SUBJECTS[subject]
