"""Write ``empath/config/typed.py``, the configuration's types, from the schema.

Each section of ``config/schema.py`` becomes a ``Protocol`` whose read-only properties are its
keys, typed by the key's value type (``ValueType.annotation``: a duration is a ``float`` of
seconds, a size an ``int`` of bytes, ``host:port`` an ``Address``, a list a tuple, a key with
choices a ``Literal``; ``| None`` when the key may be null). A list of mappings
(``listeners``) is a tuple of its section's type, a mapping keyed by domain
(``delivery.domains``) a ``Mapping`` from ``str``. ``load_config`` returns the loaded tree as
``Config``, so mypy checks every ``cfg.<section>.<key>`` against the table the loader validates
with; there is no second list of keys to keep in step. The generated file is committed and
``tests/unit/test_config_types.py`` fails when it differs from this module's output.
Regenerate it after changing the schema (as ``conf/empath.yaml`` and docs/CONFIGURATION.md)::

    .venv/bin/python -c "from empath.config.typegen import write_types; write_types()"
"""

from __future__ import annotations

import keyword
import os
import textwrap

from empath.config.schema import SCHEMA, Key, Section

HEADER = '''\
"""The configuration's types, generated from ``config/schema.py`` by ``config/typegen.py``:
do not edit (``config.typegen.write_types()`` rewrites it).

``load_config`` returns a ``Config``: read-only sections whose keys have the Python types of
their values (docs/CONFIGURATION.md says what each one means).
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Literal, Protocol

from empath.config.types import Address

__all__ = [
{names}
]
'''

WIDTH = 100


def class_name(section: Section, parent: str) -> str:
    """``smtp.timeouts`` -> ``SmtpTimeoutsConfig``; a section's ``type_name`` wins."""
    if section.type_name is not None:
        return section.type_name
    if section is SCHEMA:
        return "Config"
    stem = "".join(part.capitalize() for part in section.name.split("_"))
    return parent.removesuffix("Config") + stem + "Config"


def _annotation(key: Key) -> str:
    text = key.type.annotation()
    return f"{text} | None" if key.nullable and not key.filled_at_load else text


def _property(name: str, annotation: str) -> list[str]:
    line = f"    def {name}(self) -> {annotation}: ..."
    if len(line) <= WIDTH or not annotation.startswith("Literal["):
        return ["    @property", line]
    # A long Literal: one choice list wrapped inside its brackets.
    inner, _, rest = annotation.removeprefix("Literal[").rpartition("]")
    wrapped = textwrap.wrap(inner, WIDTH - 8, break_long_words=False)
    return (["    @property", f"    def {name}(self) -> Literal["]
            + [" " * 8 + part for part in wrapped] + [f"    ]{rest}: ..."])


def _classes(section: Section, name: str, dotted: str, out: list[list[str]]) -> None:
    lines = [f"class {name}(Protocol):"]
    where = f"``{dotted}``" if dotted else "The whole configuration"
    doc = f"{where}: {section.doc}" if dotted else f"{where}."
    body = textwrap.wrap(doc, WIDTH - 7)
    if len(body) == 1 and len(body[0]) <= WIDTH - 10:
        lines.append(f'    """{body[0]}"""')
    else:
        lines.append(f'    """{body[0]}')
        lines.extend("    " + part for part in body[1:])
        lines.append('    """')
    lines.append("")
    nested: list[tuple[Section, str, str]] = []
    for child in section.children:
        if isinstance(child, Key) and keyword.iskeyword(child.name):
            # No attribute syntax reaches it: the code reads getattr(section, "global").
            lines.append(f"    # {child.name}: {_annotation(child)} (a Python keyword: read it "
                         f'with getattr(section, "{child.name}"))')
            continue
        if isinstance(child, Key):
            lines.extend(_property(child.name, _annotation(child)))
            continue
        child_name = class_name(child, name)
        child_dotted = f"{dotted}.{child.name}" if dotted else child.name
        if child.many:
            annotation = f"tuple[{child_name}, ...]"
            child_dotted += "[]"
        elif child.keyed_by is not None:
            annotation = f"Mapping[str, {child_name}]"
            child_dotted += ".<name>"
        else:
            annotation = child_name
        lines.extend(_property(child.name, annotation))
        nested.append((child, child_name, child_dotted))
    if section is SCHEMA:
        lines.append("    @property")
        lines.append("    def config_file(self) -> str: ...  # absolute path, set by load_config")
    out.append(lines)
    for child, child_name, child_dotted in nested:
        _classes(child, child_name, child_dotted, out)


def render_types() -> str:
    """The text of ``empath/config/typed.py``."""
    classes: list[list[str]] = []
    _classes(SCHEMA, class_name(SCHEMA, ""), "", classes)
    names = sorted(lines[0].removeprefix("class ").partition("(")[0] for lines in classes)
    head = HEADER.format(names="\n".join(f'    "{n}",' for n in names))
    return head + "".join("\n\n" + "\n".join(lines) + "\n" for lines in classes)


TYPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "typed.py")


def write_types(path: str = TYPED) -> None:
    """Rewrite ``empath/config/typed.py`` from the schema."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render_types())
