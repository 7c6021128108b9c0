"""Data: records, loaders with file:line validation, and collation (see loaders.py and collate.py)."""

from tether.data.loaders import (
    ChatFormat,
    Row,
    chat_tokenizer,
    fingerprint,
    load_feedback,
    load_preferences,
    load_prompts,
    load_sft,
    read_rows,
    render_messages,
    split_conversation,
    transcript_messages,
)
from tether.data.records import DataError, FeedbackRecord, PreferenceRecord, PromptRecord, SFTRecord
from tether.data.split import split_eval

__all__ = [
    "ChatFormat",
    "Row",
    "DataError",
    "FeedbackRecord",
    "PreferenceRecord",
    "PromptRecord",
    "SFTRecord",
    "chat_tokenizer",
    "fingerprint",
    "load_feedback",
    "load_preferences",
    "load_prompts",
    "load_sft",
    "read_rows",
    "render_messages",
    "split_conversation",
    "split_eval",
    "transcript_messages",
]
