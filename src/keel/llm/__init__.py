"""The model layer: one ChatModel protocol, typed stream events, providers behind aliases."""

from keel.llm.base import ChatModel
from keel.llm.events import ChatEvent, ChatRequest, ChatResult, Finish, TextDelta, ToolCallDelta, Usage
from keel.llm.registry import ModelInfo, ModelRegistry
from keel.llm.trace import Attempt, CallTrace, LLMObserver, NoObserver

__all__ = [
    "Attempt",
    "CallTrace",
    "ChatEvent",
    "ChatModel",
    "ChatRequest",
    "ChatResult",
    "Finish",
    "LLMObserver",
    "ModelInfo",
    "ModelRegistry",
    "NoObserver",
    "TextDelta",
    "ToolCallDelta",
    "Usage",
]
