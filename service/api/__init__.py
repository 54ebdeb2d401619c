"""The HTTP API of the EqM service (FastAPI): ``create_app(settings)`` builds it."""
from service.api.app import app_from_env, create_app

__all__ = ["create_app", "app_from_env"]
