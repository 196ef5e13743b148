"""Conversations, token windows and rolling summaries."""

from keel.context.catalog import ConversationCatalog
from keel.context.conversations import Conversation, ConversationStore, History, Summary
from keel.context.manager import ContextDecision, ContextManager, reply_message, summary_message
from keel.context.window import ContextLengthError, Counter, Turn, Window

__all__ = [
    "ContextDecision",
    "ContextLengthError",
    "ContextManager",
    "Conversation",
    "ConversationCatalog",
    "ConversationStore",
    "Counter",
    "History",
    "Summary",
    "Turn",
    "Window",
    "reply_message",
    "summary_message",
]
