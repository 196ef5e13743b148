"""The prompt registry: versioned prompts, labels and rollback, sticky experiments, canaries, feedback."""

from keel.prompts.feedback import FeedbackStore
from keel.prompts.files import PromptFileError, load_prompt_file
from keel.prompts.gate import AllowAll, GateVerdict, Promotion, PromotionGate
from keel.prompts.registry import PromptRegistry
from keel.prompts.resolver import RegistryResolver
from keel.prompts.runtime import PromptRuntime
from keel.prompts.spec import PromptSpec

__all__ = [
    "AllowAll",
    "FeedbackStore",
    "GateVerdict",
    "Promotion",
    "PromotionGate",
    "PromptFileError",
    "PromptRegistry",
    "PromptRuntime",
    "PromptSpec",
    "RegistryResolver",
    "load_prompt_file",
]
