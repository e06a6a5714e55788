"""AI operations: an LLM client, versioned prompts, structured output, and suggestions.

No Dagster, SQL or Redis here: the jobs, the queue and the store call these plain functions.
"""

from glaze_pipeline.core.ai.client import (
    AIJobError,
    Completion,
    LlmCall,
    LlmClient,
    LlmConfigError,
    LlmSettings,
)
from glaze_pipeline.core.ai.prompts import Prompt, PromptError, load_prompt
from glaze_pipeline.core.ai.structured import AnswerUsage, Structured, ask
from glaze_pipeline.core.ai.suggestions import (
    MAX_AI_COLUMNS,
    MAX_COLUMNS,
    MAX_CONTEXT,
    MAX_ROWS,
    AiColumnAnswer,
    ColumnProposal,
    RowProposal,
    Suggestion,
    TableProposal,
    TableSpec,
    check_context,
    check_count,
    existing_column,
    identifier_columns,
    row_identifiers,
    suggest_columns,
    suggest_rows,
    suggest_table,
)

__all__ = [
    "MAX_AI_COLUMNS",
    "MAX_COLUMNS",
    "MAX_CONTEXT",
    "MAX_ROWS",
    "AIJobError",
    "AiColumnAnswer",
    "AnswerUsage",
    "ColumnProposal",
    "Completion",
    "LlmCall",
    "LlmClient",
    "LlmConfigError",
    "LlmSettings",
    "Prompt",
    "PromptError",
    "RowProposal",
    "Structured",
    "Suggestion",
    "TableProposal",
    "TableSpec",
    "ask",
    "check_context",
    "check_count",
    "existing_column",
    "identifier_columns",
    "load_prompt",
    "row_identifiers",
    "suggest_columns",
    "suggest_rows",
    "suggest_table",
]
