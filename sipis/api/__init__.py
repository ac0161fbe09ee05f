"""The HTTPS app API (FastAPI on uvicorn, embedded in the core's event loop)."""

from sipis.api.app_api import create_app
from sipis.api.service_protocol import InstanceGone, InstanceService, SelectorTaken, ServiceError

__all__ = ["InstanceGone", "InstanceService", "SelectorTaken", "ServiceError", "create_app"]
