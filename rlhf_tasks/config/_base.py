"""Shared base for every config model: unknown keys are errors, every field documents itself."""
import re

from pydantic import BaseModel, ConfigDict

_CODE_SPAN = re.compile(r"(`[^`]*`)")


def markdown_safe(text: str) -> str:
    """`text` with `<` and `>` outside code spans written as HTML entities: the Prefect UI renders descriptions
    as markdown and drops `<placeholder>` as an unknown HTML tag, while `&lt;placeholder&gt;` shows as typed
    (inside backticks the characters are literal already)."""
    parts = _CODE_SPAN.split(text)
    return "".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _markdown_safe_descriptions(schema: dict, _model) -> None:
    """pydantic `json_schema_extra`: every description of a section's JSON schema (the Prefect form) is
    markdown-safe; the Python-side descriptions stay as written."""
    if isinstance(schema.get("description"), str):
        schema["description"] = markdown_safe(schema["description"])
    for prop in schema.get("properties", {}).values():
        if isinstance(prop.get("description"), str):
            prop["description"] = markdown_safe(prop["description"])


class Section(BaseModel):
    """Base of every config section. `extra="forbid"` turns a typo into an error naming the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              json_schema_extra=_markdown_safe_descriptions)
