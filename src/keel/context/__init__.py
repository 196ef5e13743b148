"""Conversations and (later) token windows and summaries."""

from keel.context.conversations import Conversation, ConversationStore

__all__ = ["Conversation", "ConversationStore"]
