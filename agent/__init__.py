"""The edge agent: the serving data plane and its transports.

Public API of the data plane (transports and the daemon import from here):

    DataPlane             infer / model_metadata / model_ready / server_live / server_ready / server_metadata
    ModelConfig           per-device serving settings of one model (batching overrides, queue, deadline)
    protocol              the Open Inference Protocol codec (InferRequest, InferResponse, decode/encode)
    errors                AgentError and its tree; every error carries its `status`

The HTTP edge is `agent.http_server` (imports aiohttp); MQTT lives beside it.
"""

from . import errors, protocol
from .config import ModelConfig, ServerConfig
from .dataplane import DataPlane, ServedModel, deadline_after
from .errors import AgentError
from .metrics import ServingMetrics, TailLatency
from .protocol import InferRequest, InferResponse

__all__ = [
    "AgentError", "DataPlane", "InferRequest", "InferResponse", "ModelConfig", "ServedModel", "ServerConfig",
    "ServingMetrics", "TailLatency", "deadline_after", "errors", "protocol",
]
