"""Prompts as versioned files: `prompts/<name>.v<N>.md`, one file per version, never edited.

A file holds the system message, a line `---user---`, then the user message template. The
system message's first line is `glaze-operation: <name>`, so a server log (and the mock LLM)
can tell the operations apart. In the user template `{word}` (letters, digits, underscores)
is a placeholder; any other brace is text, so JSON examples need no escaping.

`{input}` is special: it becomes every variable as one JSON object, and every template ends
with it inside `<input>...</input>`. User text (a context, an AI column's question) only ever
travels there, as a JSON string: data the model reads, never instructions spliced into ours.
Its `<`, `>` and `&` are escaped, so a context holding `</input>` cannot close the block.

A change to a prompt is a new file (`.v2.md`): the version is recorded with every result, so
an answer can be traced to the exact words that asked for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from glaze_pipeline.core.errors import GlazeError

PROMPTS_DIR = Path(__file__).with_name("prompts")
USER_SEPARATOR = "---user---"
OPERATION_PREFIX = "glaze-operation: "
INPUT_PLACEHOLDER = "input"

_FILE_RE = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)\.v(?P<number>[1-9][0-9]*)\.md$")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PromptError(GlazeError):
    """A prompt that does not exist, a prompt file that is malformed, or a missing variable."""


@dataclass(frozen=True)
class Prompt:
    """One version of one prompt; `version` is what results record (`"ai_column.v1"`)."""

    name: str
    version: str
    system: str
    user: str

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The variables the user template names, `input` excluded, in order."""
        names = dict.fromkeys(_PLACEHOLDER_RE.findall(self.user))
        names.pop(INPUT_PLACEHOLDER, None)
        return tuple(names)

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """The chat messages: the system message, then the user template filled in."""
        missing = [name for name in self.placeholders if name not in variables]
        if missing:
            raise PromptError(f"prompt {self.version} needs the variable {missing[0]!r}")

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == INPUT_PLACEHOLDER:
                return input_json(variables)
            return str(variables[name])

        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": _PLACEHOLDER_RE.sub(fill, self.user)},
        ]


def input_json(variables: Mapping[str, Any]) -> str:
    """The variables as one JSON object that cannot break out of `<input>...</input>`."""
    text = json.dumps(dict(variables), ensure_ascii=False, indent=1, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def load_prompt(name: str, version: str | None = None) -> Prompt:
    """A prompt by name: `version` (`"table_suggestions.v1"` or `"v1"`), else the latest."""
    versions = prompt_versions(name)
    if not versions:
        known = ", ".join(prompt_names()) or "none"
        raise PromptError(f"unknown prompt {name!r}: the prompts are {known}")
    if version is None:
        number = versions[-1]
    else:
        wanted = version.removeprefix(f"{name}.")
        number = int(wanted[1:]) if re.fullmatch(r"v[1-9][0-9]*", wanted) else 0
        if number not in versions:
            shown = ", ".join(f"{name}.v{n}" for n in versions)
            raise PromptError(f"unknown version {version!r} of prompt {name!r}: there is {shown}")
    return _read(name, number)


def prompt_versions(name: str) -> tuple[int, ...]:
    """The version numbers of a prompt that exist, oldest first."""
    return tuple(sorted(number for found, number in _files() if found == name))


def prompt_names() -> tuple[str, ...]:
    return tuple(sorted({name for name, _ in _files()}))


@cache
def _files() -> frozenset[tuple[str, int]]:
    found = set()
    for path in PROMPTS_DIR.glob("*.md"):
        match = _FILE_RE.match(path.name)
        if match:
            found.add((match.group("name"), int(match.group("number"))))
    return frozenset(found)


@cache
def _read(name: str, number: int) -> Prompt:
    path = PROMPTS_DIR / f"{name}.v{number}.md"
    text = path.read_text(encoding="utf-8")
    system, separator, user = text.partition(f"\n{USER_SEPARATOR}\n")
    if not separator:
        raise PromptError(f"prompt file {path.name} has no line {USER_SEPARATOR!r}")
    system, user = system.strip(), user.strip()
    if system.splitlines()[0:1] != [f"{OPERATION_PREFIX}{name}"]:
        raise PromptError(f"prompt file {path.name} must start with '{OPERATION_PREFIX}{name}'")
    if not user.endswith("<input>\n{input}\n</input>"):
        raise PromptError(f"prompt file {path.name} must end with <input>{{input}}</input>")
    return Prompt(name=name, version=f"{name}.v{number}", system=system, user=user)
