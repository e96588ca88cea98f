"""Value types of the configuration: how a YAML scalar becomes a Python value.

Each type is a small object with ``convert(value, ctx) -> python value`` that raises
``ValueError`` with a message saying what was expected; the loader adds file, line and key.
Types never read files or clocks; ``ctx`` carries what they need (the base directory).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit


class Address(NamedTuple):
    """A ``host:port`` pair; IPv6 hosts are written ``[::1]:25`` and stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Context:
    base_dir: str


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB|K|M|G)?\s*$", re.I)
_SIZE_UNITS = {"B": 1, "K": 1024, "KB": 1000, "KIB": 1024, "M": 1024**2, "MB": 1000**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1000**3, "GIB": 1024**3, None: 1}
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)"
                     r"(\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*\.?$")


class ValueType:
    """Base: ``describe`` is what the error message says was expected."""

    describe = "a value"

    def convert(self, value: Any, ctx: Context) -> Any:
        raise NotImplementedError

    def annotation(self) -> str:
        """The Python type of a converted value, as written in the generated
        ``empath/config/typed.py`` (``config.typegen``)."""
        raise NotImplementedError(f"{type(self).__name__} has no annotation")

    def render(self, value: Any) -> str:
        """The YAML text of a default value, for the generated configuration file."""
        import json

        import yaml

        if isinstance(value, str):
            plain = re.fullmatch(r"[A-Za-z0-9_./@+ -]*[A-Za-z0-9_./@+-]", value)
            if plain and yaml.safe_load(value) == value:
                return value
            return json.dumps(value)
        text: str = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        return text.removesuffix("\n...").strip()


class Str(ValueType):
    def __init__(self, choices: tuple[str, ...] | None = None, pattern: str | None = None,
                 lower: bool = False) -> None:
        self.choices = choices
        self.pattern = re.compile(pattern) if pattern else None
        self.lower = lower
        self.describe = ("one of " + ", ".join(choices)) if choices else "a string"

    def annotation(self) -> str:
        if self.choices is None:
            return "str"
        return "Literal[" + ", ".join(f'"{c}"' for c in self.choices) + "]"

    def convert(self, value: Any, ctx: Context) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"must be {self.describe}")
        text = str(value)
        if self.lower:
            text = text.lower()
        if self.choices is not None and text not in self.choices:
            raise ValueError(f"must be {self.describe}, not {text!r}")
        if self.pattern is not None and not self.pattern.match(text):
            raise ValueError(f"{text!r} is not {self.describe}")
        return text


class Bool(ValueType):
    describe = "true or false"

    def annotation(self) -> str:
        return "bool"

    def convert(self, value: Any, ctx: Context) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"must be {self.describe}")
        return value


class Int(ValueType):
    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.describe = "an integer" + _range_text(minimum, maximum)

    def annotation(self) -> str:
        return "int"

    def convert(self, value: Any, ctx: Context) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be {self.describe}")
        _check_range(value, self.minimum, self.maximum, self.describe)
        return value


class Priority(Int):
    """A message priority: an integer, or ``high`` (5), ``normal`` (0) or ``low`` (-5)."""

    NAMES = {"high": 5, "normal": 0, "low": -5}

    def __init__(self, minimum: int = -100, maximum: int = 100) -> None:
        super().__init__(minimum, maximum)
        self.describe = f"high, normal, low or an integer{_range_text(minimum, maximum)}"

    def convert(self, value: Any, ctx: Context) -> Any:
        if isinstance(value, str):
            if value.lower() not in self.NAMES:
                raise ValueError(f"must be {self.describe}, not {value!r}")
            return self.NAMES[value.lower()]
        return super().convert(value, ctx)


class Float(ValueType):
    def __init__(self, minimum: float | None = None, maximum: float | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.describe = "a number" + _range_text(minimum, maximum)

    def annotation(self) -> str:
        return "float"

    def convert(self, value: Any, ctx: Context) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be {self.describe}")
        _check_range(value, self.minimum, self.maximum, self.describe)
        return float(value)


class Duration(ValueType):
    """``30s``, ``5m``, ``24h``, ``5d``, ``250ms``, or a plain number of seconds → float."""

    def __init__(self, minimum: float = 0.0, maximum: float | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.describe = "a duration such as 30s, 5m, 24h or 5d" + _range_text(minimum, maximum)

    def annotation(self) -> str:
        return "float"  # seconds

    def convert(self, value: Any, ctx: Context) -> Any:
        seconds = parse_duration(value)
        _check_range(seconds, self.minimum, self.maximum, self.describe)
        return seconds

    def render(self, value: Any) -> str:
        return format_duration(value) if isinstance(value, int | float) else super().render(value)


class Size(ValueType):
    """``35MB``, ``512KiB``, ``10M`` (binary), or a plain number of bytes → int."""

    def __init__(self, minimum: int = 0, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.describe = "a size such as 512KiB, 35MB or a number of bytes"

    def annotation(self) -> str:
        return "int"  # bytes

    def convert(self, value: Any, ctx: Context) -> Any:
        size = parse_size(value)
        _check_range(size, self.minimum, self.maximum, self.describe)
        return size

    def render(self, value: Any) -> str:
        for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024),
                             ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
            if isinstance(value, int) and value and value % factor == 0:
                return f"{value // factor}{unit}"
        return super().render(value)


class HostPort(ValueType):
    """``host:port`` or ``[v6]:port``; ``default_port`` allows a bare host."""

    def __init__(self, default_port: int | None = None) -> None:
        self.default_port = default_port
        self.describe = "host:port" + (f" (port defaults to {default_port})"
                                       if default_port else "")

    def annotation(self) -> str:
        return "Address"

    def convert(self, value: Any, ctx: Context) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be {self.describe}, as a string")
        return parse_address(value, self.default_port)


class Path(ValueType):
    """A file or directory path; relative paths are taken against ``base_dir``."""

    describe = "a path"

    def annotation(self) -> str:
        return "str"  # absolute, normalized

    def convert(self, value: Any, ctx: Context) -> Any:
        import os

        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty path")
        return os.path.normpath(os.path.join(ctx.base_dir, os.path.expanduser(value)))


class Network(ValueType):
    describe = "an IP network such as 127.0.0.0/8 or ::1/128"

    def annotation(self) -> str:
        return "IPv4Network | IPv6Network"

    def convert(self, value: Any, ctx: Context) -> Any:
        try:
            return ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not {self.describe}") from None

    def render(self, value: Any) -> str:
        return super().render(str(value))


class Domain(ValueType):
    describe = "a domain name"

    def annotation(self) -> str:
        return "str"  # lower-case ASCII (IDNA), no final dot

    def convert(self, value: Any, ctx: Context) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be {self.describe}")
        return normalize_domain(value)


class ListOf(ValueType):
    def __init__(self, item: ValueType) -> None:
        self.item = item
        self.describe = f"a list of {item.describe}"

    def annotation(self) -> str:
        return f"tuple[{self.item.annotation()}, ...]"  # the loader makes lists tuples

    def convert(self, value: Any, ctx: Context) -> Any:
        # A list's items are converted by the loader, which knows their lines.
        raise NotImplementedError


class Mapping(ValueType):
    """A free-form mapping (module options): passed through as plain data."""

    describe = "a mapping"

    def annotation(self) -> str:
        return "Mapping[str, Any]"  # free-form, as written

    def convert(self, value: Any, ctx: Context) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"must be {self.describe}")
        return value


class URL(Str):
    """A URL of one of ``schemes`` with a host, no port 0, and no secret written in it (a
    secret in the URL would sit in the configuration, its copies and the logs)."""

    def __init__(self, schemes: tuple[str, ...], describe: str, secret_error: str,
                 user_allowed: bool = False) -> None:
        super().__init__()
        self.schemes = schemes
        self.describe = describe
        self.secret_error = secret_error
        self.user_allowed = user_allowed  # a user name without a password is no secret

    def convert(self, value: Any, ctx: Context) -> Any:
        text = super().convert(value, ctx)
        try:
            parts = urlsplit(text)
            port = parts.port  # ValueError when it is not a number from 0 to 65535
        except ValueError as exc:
            raise ValueError(f"{text!r} is not {self.describe}: {exc}") from None
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueError(f"{text!r} is not {self.describe} with a host")
        if parts.password is not None or (parts.username is not None and not self.user_allowed):
            raise ValueError(self.secret_error)
        if port == 0:
            raise ValueError(f"{text!r}: port 0")
        return text


class StrategyName(Str):
    """smtp | webhook | package.module:Class (a DeliveryStrategy subclass, checked at load)."""

    def __init__(self) -> None:
        super().__init__(pattern=r"^(smtp|webhook|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
        self.describe = "smtp, webhook or package.module:Class"


class DNSSECMode(Str):
    """off | log | enforce; YAML 1.1 reads a bare ``off`` as false, so false is off too."""

    def __init__(self) -> None:
        super().__init__(("off", "log", "enforce"))

    def convert(self, value: Any, ctx: Context) -> Any:
        return super().convert("off" if value is False else value, ctx)


# -- parsing helpers, also used outside the loader -----------------------------------------

def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m, 24h or 5d")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 24h or 5d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1 and seconds:
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512KiB, 35MB or a number of bytes")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size such as 512KiB, 35MB or a number of bytes")
    unit = m.group(2).upper() if m.group(2) else None
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_address(text: str, default_port: int | None = None) -> Address:
    """Parse ``host:port`` (``[v6]:port``); raise ValueError naming what is wrong."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: unbalanced '[' in address")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not host:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r}: missing port (host:port)")
        return Address(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return Address(host, int(port_text))


def normalize_domain(name: str) -> str:
    """Lower-cased ASCII (IDNA) form of a domain; ValueError when it is not one."""
    text = name.strip().rstrip(".").lower()
    try:
        ascii_name = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        raise ValueError(f"{name!r} is not a domain name") from None
    if not _DOMAIN.match(ascii_name):
        raise ValueError(f"{name!r} is not a domain name")
    return ascii_name


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f" >= {minimum:g}"
    if maximum is not None:
        return f" <= {maximum:g}"
    return ""


def _check_range(value: float, minimum: float | None, maximum: float | None,
                 describe: str) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"must be {describe}; {value:g} is out of range")
