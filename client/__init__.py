"""hydra-rm's HTTP client and trainer adapters; needs only httpx (no torch, no server code).

from client import HydraClient
with HydraClient("http://rm-0:8000,http://rm-1:8000") as rm:
    scores = rm.score([{"prompt": "2+2?", "response": "4"}])
    scores[0].reward, scores[0].heads, scores[0].std
"""

from client._client import AsyncHydraClient, HydraClient
from client._core import Limits
from client.results import (
    HydraError,
    HydraHTTPError,
    HydraUnavailable,
    ModelInfo,
    ProtocolError,
    Score,
    ScoreList,
)

__all__ = [
    "AsyncHydraClient",
    "HydraClient",
    "HydraError",
    "HydraHTTPError",
    "HydraUnavailable",
    "Limits",
    "ModelInfo",
    "ProtocolError",
    "Score",
    "ScoreList",
]
