"""Load and validate a configuration file against the schema.

Every problem is a ConfigError whose text names the file, the line and the dotted key:
``conf/empath.yaml:12: smtp.max_recipients: must be an integer from 1 to 100000``. The result
is a tree of read-only ``Namespace`` objects whose attribute names are the YAML keys
(``cfg.smtp.timeouts.command``, ``cfg.listeners[0].address.port``,
``cfg.delivery.domains["example.com"].mx_override``). Loading has no side effect beyond reading
the file (and checking that files it names exist).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterator
from typing import Any

import yaml

from empath.config.schema import SCHEMA, Key, Section
from empath.config.types import Context, ListOf, Path


class ConfigError(Exception):
    """An invalid configuration; ``str()`` names file, line and key."""

    def __init__(self, message: str, file: str = "", line: int | None = None,
                 key: str = "") -> None:
        self.file, self.line, self.key, self.reason = file, line, key, message
        where = file + (f":{line}" if line else "")
        text = ": ".join(p for p in (where, key, message) if p)
        super().__init__(text)


class Namespace:
    """A read-only mapping with attribute access, one per configuration section."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("configuration is read-only")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Namespace) and self._values == other._values

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"Namespace({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._values.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


Config = Namespace  # the root namespace; ``config_file`` is added by load_config


class _Loader:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.yaml = yaml.SafeLoader(text)
        self.ctx = Context(os.path.dirname(os.path.abspath(path)))

    def fail(self, node: yaml.Node | None, key: str, message: str) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(message, self.path, line, key)

    def scalar(self, node: yaml.Node) -> Any:
        return self.yaml.construct_object(node, deep=True)

    # -- walking ---------------------------------------------------------------------------
    def section(self, sec: Section, node: yaml.Node | None, prefix: str) -> Namespace:
        """Validate a mapping node against ``sec``; absent keys take their defaults."""
        given: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        if node is not None and not _is_null(node):
            if not isinstance(node, yaml.MappingNode):
                raise self.fail(node, prefix or "(top level)", "must be a mapping of keys")
            for knode, vnode in node.value:
                name = self.scalar(knode)
                dotted = f"{prefix}.{name}" if prefix else str(name)
                if not isinstance(name, str) or sec.child(name) is None:
                    known = ", ".join(c.name for c in sec.children)
                    raise self.fail(knode, dotted, f"unknown key (known here: {known})")
                if name in given:
                    raise self.fail(knode, dotted, "key given twice")
                given[name] = (knode, vnode)
        if "base_dir" in given and sec is SCHEMA:
            # base_dir first: every other path is relative to it.
            knode, vnode = given["base_dir"]
            self.ctx = Context(self.value(SCHEMA.child("base_dir"), vnode, "base_dir"))  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        for child in sec.children:
            dotted = f"{prefix}.{child.name}" if prefix else child.name
            vnode = given[child.name][1] if child.name in given else None
            if sec is SCHEMA and child.name == "base_dir":
                values[child.name] = self.ctx.base_dir  # resolved first, above
            elif isinstance(child, Section):
                values[child.name] = self.subsection(child, vnode, dotted)
            elif vnode is None:
                values[child.name] = self.default(child, dotted, node)
            else:
                values[child.name] = self.value(child, vnode, dotted)
        return Namespace(values)

    def subsection(self, sec: Section, node: yaml.Node | None, dotted: str) -> Any:
        if sec.many:
            if node is None:
                # The default list goes through the same validation as a written one.
                items = yaml.SafeLoader(yaml.safe_dump(sec.default)).get_single_node()
                assert isinstance(items, yaml.SequenceNode)
                return tuple(self.section(sec, item, f"{dotted}[{i}]")
                             for i, item in enumerate(items.value))
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, dotted, "must be a list")
            return tuple(self.section(sec, item, f"{dotted}[{i}]")
                         for i, item in enumerate(node.value))
        if sec.keyed_by is not None:
            if node is None or _is_null(node):
                return {}
            if not isinstance(node, yaml.MappingNode):
                raise self.fail(node, dotted, "must be a mapping")
            out: dict[str, Namespace] = {}
            for knode, vnode in node.value:
                try:
                    name = sec.keyed_by.convert(self.scalar(knode), self.ctx)
                except ValueError as exc:
                    raise self.fail(knode, f"{dotted}.{self.scalar(knode)}", str(exc)) from None
                if name in out:
                    raise self.fail(knode, f"{dotted}.{name}", "given twice")
                out[name] = self.section(sec, vnode, f"{dotted}.{name}")
            return out
        return self.section(sec, node, dotted)

    def default(self, key: Key, dotted: str, parent: yaml.Node | None) -> Any:
        if key.default is None:
            if key.nullable:
                return None
            raise self.fail(parent, dotted, "required key is missing")
        if isinstance(key.type, Path) and key.name == "base_dir":
            return self.ctx.base_dir
        if isinstance(key.type, ListOf):
            return tuple(key.type.item.convert(v, self.ctx) for v in key.default)
        return key.type.convert(key.default, self.ctx)

    def value(self, key: Key, node: yaml.Node, dotted: str) -> Any:
        if _is_null(node):
            if key.nullable:
                return None
            raise self.fail(node, dotted, f"must be {key.type.describe}, not null")
        if isinstance(key.type, ListOf):
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, dotted, f"must be {key.type.describe}")
            items = []
            for i, item in enumerate(node.value):
                try:
                    items.append(key.type.item.convert(self.scalar(item), self.ctx))
                except ValueError as exc:
                    raise self.fail(item, f"{dotted}[{i}]", str(exc)) from None
            return tuple(items)
        try:
            return key.type.convert(self.scalar(node), self.ctx)
        except ValueError as exc:
            raise self.fail(node, dotted, str(exc)) from None


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _find_node(root: yaml.Node | None, dotted: str) -> yaml.Node | None:
    """The YAML node of a dotted key (``listeners[0].tls``), for cross-field errors. A mapping
    key may hold dots itself (``delivery.domains.example.com.strategy``): the longest key
    that matches is taken."""
    node = root
    parts = dotted.replace("]", "").replace("[", ".").split(".")
    i = 0
    while i < len(parts):
        if isinstance(node, yaml.MappingNode):
            keys = {str(k.value): v for k, v in node.value}
            for j in range(len(parts), i, -1):
                found = keys.get(".".join(parts[i:j]))
                if found is not None:
                    node, i = found, j
                    break
            else:
                return None
        elif isinstance(node, yaml.SequenceNode) and parts[i].isdigit():
            index = int(parts[i])
            node = node.value[index] if index < len(node.value) else None
            i += 1
        else:
            return None
    return node


def load_config(path: str) -> Namespace:
    """Read, validate and convert the configuration file at ``path``; ConfigError on error."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", path) from None
    loader = _Loader(path, text)
    try:
        root = loader.yaml.get_single_node()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"not valid YAML: {exc.problem}", path, line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path) from None
    cfg = loader.section(SCHEMA, root, "")
    _check(cfg, loader, root)
    values = dict(cfg._values)
    values["config_file"] = os.path.abspath(path)
    if values["hostname"] is None:
        values["hostname"] = socket.getfqdn()
    return Namespace(values)


def _check(cfg: Namespace, loader: _Loader, root: yaml.Node | None) -> None:
    """Rules across keys: things a single value's type cannot say."""

    def fail(dotted: str, message: str) -> ConfigError:
        return loader.fail(_find_node(root, dotted), dotted, message)

    if not cfg.listeners:
        raise fail("listeners", "at least one listener is needed")
    seen = set()
    for i, lst in enumerate(cfg.listeners):
        if lst.address in seen:
            raise fail(f"listeners[{i}].address", f"{lst.address} is listed twice")
        seen.add(lst.address)
        cert, key = lst.tls.cert, lst.tls.key
        if (cert is None) != (key is None):
            raise fail(f"listeners[{i}].tls", "set both cert and key, or neither")
        if lst.mode == "smtps" and cert is None:
            raise fail(f"listeners[{i}].tls", "mode smtps needs tls.cert and tls.key")
        for name, file in (("cert", cert), ("key", key)):
            if file is not None and not os.path.isfile(file):
                raise fail(f"listeners[{i}].tls.{name}", f"no such file: {file}")
    for i, lst in enumerate(cfg.listeners):
        if lst.mode in ("submission", "smtps") and cfg.smtp.auth.password_file is None:
            raise fail(f"listeners[{i}].mode",
                       f"mode {lst.mode} requires AUTH: set smtp.auth.password_file")
    for domain, entry in cfg.dkim.domains.items():
        if not os.path.isfile(entry.key):
            raise fail(f"dkim.domains.{domain}.key", f"no such file: {entry.key}")
    pwfile = cfg.smtp.auth.password_file
    if pwfile is not None and not os.path.isfile(pwfile):
        raise fail("smtp.auth.password_file", f"no such file: {pwfile}")
    users = cfg.local_delivery.users
    if users is not None and not os.path.isfile(users):
        raise fail("local_delivery.users", f"no such file: {users}")
    ca = cfg.delivery.tls.ca_file
    if ca is not None and not os.path.isfile(ca):
        raise fail("delivery.tls.ca_file", f"no such file: {ca}")
    for i, mod in enumerate(cfg.smtp.modules):
        try:
            found = importlib.util.find_spec(mod.name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise fail(f"smtp.modules[{i}].name", f"cannot import module {mod.name!r}")
    if cfg.delivery.retry_max_delay < cfg.delivery.retry_base_delay:
        raise fail("delivery.retry_max_delay", "must not be less than retry_base_delay")
    _check_webhooks(cfg, fail)
    _check_strategies(cfg, fail)


def _check_webhooks(cfg: Namespace, fail: Any) -> None:
    """``strategy: webhook`` needs a URL, a secret file that exists, and a domain that is not
    delivered locally (local_domains go to Maildir or LMTP whatever their strategy)."""
    local = set(cfg.local_domains)
    for domain, policy in cfg.delivery.domains.items():
        key = f"delivery.domains.{domain}"
        if policy.strategy != "webhook":
            continue
        if policy.webhook.url is None:
            raise fail(f"{key}.webhook.url", "strategy webhook needs webhook.url")
        if domain in local:
            raise fail(f"{key}.strategy", f"{domain} is in local_domains and is delivered "
                       "locally; list it in relay_domains to deliver it by webhook")
        secret = policy.webhook.secret_file
        if secret is not None and not os.path.isfile(secret):
            raise fail(f"{key}.webhook.secret_file", f"no such file: {secret}")


def _check_strategies(cfg: Namespace, fail: Any) -> None:
    """A ``package.module:Class`` strategy must import and be a DeliveryStrategy."""
    from empath.delivery.strategy import BUILTIN, StrategyError, load_class

    for domain, policy in cfg.delivery.domains.items():
        if policy.strategy in BUILTIN:
            continue
        try:
            load_class(policy.strategy)
        except StrategyError as exc:
            raise fail(f"delivery.domains.{domain}.strategy", str(exc)) from None
