"""Prompt templates: an example -> the prompt text that precedes the response.

The default is the Alpaca template FlexLoRA's reference code uses (through Shepherd and
alpaca-lora). A template can also be read from an alpaca-lora style JSON file with the keys
``prompt_input`` and ``prompt_no_input`` (``{instruction}`` / ``{input}`` placeholders).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from flexlora.data.types import Example
from flexlora.errors import DataError, UsageError

__all__ = ["TEMPLATES", "PromptTemplate", "get_template", "render_prompt"]


@dataclass(frozen=True)
class PromptTemplate:
    """Two format strings: one for examples with an input, one for those without."""

    name: str
    prompt_input: str
    prompt_no_input: str


ALPACA = PromptTemplate(
    name="alpaca",
    prompt_input=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    prompt_no_input=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")

#: a bare template for debugging and tiny models: no preamble
PLAIN = PromptTemplate(
    name="plain",
    prompt_input="{instruction}\n\n{input}\n\n",
    prompt_no_input="{instruction}\n\n",
)

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (ALPACA, PLAIN)}


def load_template_file(path: str | Path) -> PromptTemplate:
    """An alpaca-lora style template JSON (``prompt_input`` / ``prompt_no_input``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(path, f"cannot read template: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON (column {exc.colno}): {exc.msg}", exc.lineno) from exc
    if not isinstance(data, dict):
        raise DataError(path, "a template file must hold a JSON object")
    for key in ("prompt_input", "prompt_no_input"):
        if not isinstance(data.get(key), str):
            raise DataError(path, f"missing string field {key!r}")
    return PromptTemplate(path.stem, data["prompt_input"], data["prompt_no_input"])


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """A template by name (``alpaca``, ``plain``) or from a ``.json`` file path."""
    if isinstance(template, PromptTemplate):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if template.endswith(".json"):
        return load_template_file(template)
    known = ", ".join(sorted(TEMPLATES))
    raise UsageError(f"unknown template {template!r}; use one of {known} or a .json file")


def render_prompt(example: Example, template: str | PromptTemplate = "alpaca") -> str:
    """The prompt for ``example``: everything before the response (the response is not in it).

    Training appends ``example.output`` and EOS, and masks the prompt tokens out of the loss
    when train-on-inputs is off; evaluation generates from this prompt.
    """
    t = get_template(template)
    fields = {"instruction": example.instruction, "input": example.input}
    text = t.prompt_input if example.input else t.prompt_no_input
    # one pass, not str.format: texts routinely contain braces, even "{input}"
    return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], text)
