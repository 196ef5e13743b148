"""The model layer: one ChatModel protocol, typed stream events, providers behind aliases."""

from keel.llm.base import ChatModel
from keel.llm.events import ChatEvent, ChatRequest, ChatResult, Finish, TextDelta, ToolCallDelta, Usage
from keel.llm.registry import ModelInfo, ModelRegistry

__all__ = [
    "ChatEvent",
    "ChatModel",
    "ChatRequest",
    "ChatResult",
    "Finish",
    "ModelInfo",
    "ModelRegistry",
    "TextDelta",
    "ToolCallDelta",
    "Usage",
]
