"""Model zoo. Importing this package registers every family."""

from training.models import cnn, resnet, vit  # noqa: F401  (registers the models)
from training.models._registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model"]
