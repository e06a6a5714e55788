"""AI columns: a column whose cells an LLM fills from a prompt template, one call per entity.

A template may only name the entity's identifiers (`{company}`, `{domain}`, ...), never other
cells of a row: so every row about the same company asks the same question, and the job asks
it once per unique entity (entity-first, like every other field), then caches the answer by
entity, prompt version and model.
"""

from __future__ import annotations

import hashlib
import string

from glaze_pipeline.core.errors import InputError
from glaze_pipeline.core.fields import FieldRef
from glaze_pipeline.core.models import EntityKey, EntityType

MAX_TEMPLATE = 2000

COMPANY_PLACEHOLDERS = ("company", "domain", "name")
PERSON_PLACEHOLDERS = ("person", "full_name", "email", "linkedin", "company")
# Placeholders that only a person has: a template naming one is about a person.
_PERSON_ONLY = frozenset(PERSON_PLACEHOLDERS) - frozenset(COMPANY_PLACEHOLDERS)
AI_FIELD_PREFIX = "ai_"


class InvalidPromptError(InputError):
    """An AI column's template that cannot be used (empty, too long, unknown placeholder)."""


def placeholders(template: str) -> list[str]:
    """The `{names}` a template uses, in order; malformed braces are refused."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise InvalidPromptError(
            f"AI column prompt has malformed braces ({error}); write {{{{ and }}}} for a literal brace"
        ) from None
    names: list[str] = []
    for _text, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise InvalidPromptError(
                f"AI column prompt placeholder {{{name}}} is not a plain name such as {{company}}"
            )
        names.append(name)
    return names


def template_entity_type(template: str) -> EntityType:
    """The entity a template is about: a person when it names a person's identifier."""
    return (
        EntityType.PERSON
        if any(name in _PERSON_ONLY for name in placeholders(template))
        else EntityType.COMPANY
    )


def check_template(template: str) -> str:
    """A usable template, stripped; raises InvalidPromptError naming the problem."""
    text = template.strip()
    if not text:
        raise InvalidPromptError("AI column prompt is empty")
    if len(text) > MAX_TEMPLATE:
        raise InvalidPromptError(
            f"AI column prompt is {len(text)} characters long; the limit is {MAX_TEMPLATE}"
        )
    entity_type = template_entity_type(text)
    allowed = PERSON_PLACEHOLDERS if entity_type is EntityType.PERSON else COMPANY_PLACEHOLDERS
    unknown = [name for name in placeholders(text) if name not in allowed]
    if unknown:
        raise InvalidPromptError(
            f"AI column prompt uses unknown placeholder {{{unknown[0]}}}: a {entity_type.value} "
            f"prompt can use {', '.join('{' + name + '}' for name in allowed)}"
        )
    return text


def ai_field(template: str) -> FieldRef:
    """The field an AI column means: its entity type and a name that stands for its template."""
    text = template.strip()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return FieldRef(template_entity_type(text), AI_FIELD_PREFIX + digest)


def is_ai_field(field: FieldRef | None) -> bool:
    return field is not None and field.name.startswith(AI_FIELD_PREFIX)


def entity_variables(key: EntityKey) -> dict[str, str]:
    """What each placeholder means for one entity: its identifiers as detection found them."""
    if key.type is EntityType.COMPANY:
        domain = key.value if key.kind == "domain" else ""
        name = key.value if key.kind == "name" else ""
        return {"company": key.value, "domain": domain, "name": name or key.value}
    full_name, company = "", ""
    if key.kind == "name_company":
        full_name, _, company = key.value.partition("|")
    elif key.kind == "email":
        company = key.value.rpartition("@")[2]  # the work email's domain: the company's
    return {
        "person": key.value if key.kind != "name_company" else f"{full_name} ({company})",
        "full_name": full_name,
        "email": key.value if key.kind == "email" else "",
        "linkedin": key.value if key.kind == "linkedin" else "",
        "company": company,
    }


def fill_template(template: str, key: EntityKey) -> str:
    """The question for one entity; an identifier it lacks reads as `unknown`."""
    variables = {name: value or "unknown" for name, value in entity_variables(key).items()}
    return template.strip().format(**variables)


def question_input(template: str, key: EntityKey) -> dict[str, str]:
    """What the `ai_column` prompt is given for one entity: the filled question, and who it is
    about (the prompt passes it as data inside `<input>`, never as instructions)."""
    return {
        "template": fill_template(template, key),
        "entity_type": key.type.value,
        "entity": key.value,
    }
