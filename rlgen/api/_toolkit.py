"""Lower-level pieces that rlgen's own benchmarks and recipes need, exported deliberately (and only these):
each is a stable entry point, not a promise about the module it lives in."""
from __future__ import annotations

from rlgen.diffusion import classifier, digits, pipeline
from rlgen.models import causal_lm, char_tokenizer
from rlgen.plugins import registry


def task_records(task: str, split: str = "train") -> list[dict]:
    """The records of a built-in or plugin task's split ("train" or "test")."""
    return registry("task").get(task).split(split)


def resolve_model_path(name_or_path: str):
    """The directory of a causal LM: a built-in name or a Hugging Face model directory (RlgenError if neither)."""
    return causal_lm.resolve_model_path(name_or_path)


def resolve_pipeline_path(name_or_path: str):
    """The directory of an image pipeline: a built-in name or a diffusers directory (RlgenError if neither)."""
    return pipeline.resolve_pipeline_path(name_or_path)


def load_model(path, dtype: str = "float32"):
    """A causal LM from a model directory, loaded the way the trainers load it (safetensors only)."""
    return causal_lm.load_model(path, dtype)


def load_tokenizer(path):
    """The tokenizer of a model directory, loaded the way the trainers load it."""
    return causal_lm.load_tokenizer(path)


def build_char_tokenizer():
    """The character-level tokenizer of the tiny-arith model (a Hugging Face tokenizer)."""
    return char_tokenizer.build_char_tokenizer()


def digit_class_names() -> tuple[str, ...]:
    """The class names of the digits task, in label order (the tiny-digits models' classes)."""
    return tuple(digits.CLASS_NAMES)


def train_digit_classifier(steps: int, seed: int, **options):
    """Train the digit classifier behind the `digit-classifier` reward: (model, held-out accuracy)."""
    return classifier.train_classifier(steps, seed, **options)


def save_digit_classifier(model, out, **info) -> None:
    """Save a digit classifier where the `digit-classifier` reward can load it."""
    classifier.save_classifier(model, out, **info)
