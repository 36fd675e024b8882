"""Generators of crystal candidates: the interface and registry (`base`), re-exported, and one subpackage each."""

from wyckoff_lab.core.generators.base import (
    BUILTIN_GENERATORS,
    CONDITION_NAMES,
    FAILURE_REASONS,
    STABILITY_THRESHOLD_EV,
    STABILITY_VALUES,
    Candidate,
    Conditions,
    GenerationResult,
    Generator,
    GeneratorOption,
    ProgressCallback,
    TrainingRecipe,
    UnsupportedConditionError,
    available_generators,
    default_generator_name,
    describe_failure,
    generator_class,
    get_generator,
    register_generator,
    weights_folder,
)

__all__ = ["BUILTIN_GENERATORS", "CONDITION_NAMES", "FAILURE_REASONS", "STABILITY_THRESHOLD_EV", "STABILITY_VALUES",
           "Candidate", "Conditions", "GenerationResult", "Generator", "GeneratorOption", "ProgressCallback",
           "TrainingRecipe", "UnsupportedConditionError", "available_generators", "default_generator_name",
           "describe_failure", "generator_class",
           "get_generator", "register_generator", "weights_folder"]
