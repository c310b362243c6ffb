"""Model zoo. Importing this package registers every family."""

from training.models import cnn, resnet, segmentation, vit  # noqa: F401  (registers the models)
from training.models._registry import TASKS, get_model, list_models, model_task, register_model

__all__ = ["TASKS", "get_model", "list_models", "model_task", "register_model"]
