"""Load and validate a configuration file against the schema.

Every problem is a ConfigError whose text names the file, the line and the dotted key:
``conf/empath.yaml:12: smtp.max_recipients: must be an integer from 1 to 100000``. The result
is a tree of read-only ``Namespace`` objects whose attribute names are the YAML keys
(``cfg.smtp.timeouts.command``, ``cfg.listeners[0].address.port``,
``cfg.delivery.domains["example.com"].mx_override``), typed as ``config.typed.Config`` (the
Protocols generated from the schema), so the type checker knows every key and its type. Every
mistake in a file is reported in one run (``ConfigErrors``). Loading has no side effect beyond
reading the file (and checking that files it names exist, and that certificate/key pairs and
DKIM keys load).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any, cast

import yaml

from empath.config.schema import SCHEMA, Key, Section
from empath.config.typed import Config, DkimDomainConfig
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
    """A read-only mapping with attribute access, one per configuration section. The values
    are also the instance's attributes (its ``__dict__``), so reading one costs what reading
    any attribute costs: the hot paths read configuration per command and per message."""

    __slots__ = ("_values", "__dict__")

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)
        self.__dict__.update(values)

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


class ConfigErrors(ConfigError):
    """Several problems in one file: ``errors`` lists each (file, line and key), ``str()`` has
    one line per problem. The first one's attributes are this exception's."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.reason, first.file, first.line, first.key)
        self.errors = errors
        self.args = ("\n".join(str(e) for e in errors),)

    def __str__(self) -> str:
        return str(self.args[0])


class _Loader:
    def __init__(self, path: str, text: str, base_dir: str | None = None) -> None:
        self.path = path
        self.yaml = yaml.SafeLoader(text)
        self.ctx = Context(base_dir or os.path.dirname(os.path.abspath(path)))
        self.errors: list[ConfigError] = []
        self.notes: list[str] = []  # warnings found while checking (unreadable files...)
        self.base_dir_relative = False

    def fail(self, node: yaml.Node | None, key: str, message: str) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(message, self.path, line, key)

    def report(self, node: yaml.Node | None, key: str, message: str) -> None:
        """Record a problem and go on: one run names every mistake."""
        self.errors.append(self.fail(node, key, message))

    def scalar(self, node: yaml.Node) -> Any:
        return self.yaml.construct_object(node, deep=True)

    # -- walking ---------------------------------------------------------------------------
    def section(self, sec: Section, node: yaml.Node | None, prefix: str) -> Namespace:
        """Validate a mapping node against ``sec``; absent keys take their defaults. A bad
        value is recorded (``errors``) and stands as None, so the walk goes on."""
        given: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        if node is not None and not _is_null(node):
            if not isinstance(node, yaml.MappingNode):
                self.report(node, prefix or "(top level)", "must be a mapping of keys")
                node = None
            else:
                for knode, vnode in node.value:
                    name = self.scalar(knode)
                    dotted = f"{prefix}.{name}" if prefix else str(name)
                    if not isinstance(name, str) or sec.child(name) is None:
                        known = ", ".join(c.name for c in sec.children)
                        self.report(knode, dotted, f"unknown key (known here: {known})")
                    elif name in given:
                        self.report(knode, dotted, "key given twice")
                    else:
                        given[name] = (knode, vnode)
        if "base_dir" in given and sec is SCHEMA:
            # base_dir first: every other path is relative to it.
            knode, vnode = given["base_dir"]
            raw = self.scalar(vnode)
            self.base_dir_relative = isinstance(raw, str) and not os.path.isabs(
                os.path.expanduser(raw))
            try:
                self.ctx = Context(self.value(SCHEMA.child("base_dir"), vnode, "base_dir"))  # type: ignore[arg-type]
            except ConfigError as exc:
                self.errors.append(exc)
        values: dict[str, Any] = {}
        for child in sec.children:
            dotted = f"{prefix}.{child.name}" if prefix else child.name
            vnode = given[child.name][1] if child.name in given else None
            try:
                if sec is SCHEMA and child.name == "base_dir":
                    values[child.name] = self.ctx.base_dir  # resolved first, above
                elif isinstance(child, Section):
                    values[child.name] = self.subsection(child, vnode, dotted)
                elif vnode is None:
                    values[child.name] = self.default(child, dotted, node)
                else:
                    values[child.name] = self.value(child, vnode, dotted)
            except ConfigError as exc:
                self.errors.append(exc)
                values[child.name] = None
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
                    self.report(knode, f"{dotted}.{self.scalar(knode)}", str(exc))
                    continue
                if name in out:
                    self.report(knode, f"{dotted}.{name}", "given twice")
                    continue
                out[name] = self.section(sec, vnode, f"{dotted}.{name}")
            return out
        if (sec.off_key is not None and isinstance(node, yaml.ScalarNode)
                and (self.scalar(node) is False or self.scalar(node) == "off")):
            values = self.section(sec, None, dotted).to_dict()
            values[sec.off_key] = False
            return Namespace(values)
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
                    self.report(item, f"{dotted}[{i}]", str(exc))
            return tuple(items)
        try:
            return key.type.convert(self.scalar(node), self.ctx)
        except ValueError as exc:
            raise self.fail(node, dotted, str(exc)) from None


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _find_node(root: yaml.Node | None, dotted: str) -> yaml.Node | None:
    """The YAML node of a dotted key (``listeners[0].tls``, ``dkim.domains.example.com.key``),
    for cross-field errors; a mapping key may itself hold dots (a domain)."""
    parts = dotted.replace("]", "").replace("[", ".").split(".")
    node = root
    i = 0
    while i < len(parts):
        if node is None:
            return None
        if isinstance(node, yaml.MappingNode):
            for j in range(len(parts), i, -1):  # the longest name that is a key here
                name = ".".join(parts[i:j])
                found = next((v for k, v in node.value if str(k.value) == name), None)
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


def load_config(path: str, *, base_dir: str | None = None,
                warnings: list[str] | None = None, check_contents: bool = True) -> Config:
    """Read, validate and convert the configuration file at ``path``.

    Every problem is found in one pass: one ConfigError when there is one, a ConfigErrors
    naming each when there are several. ``base_dir`` replaces the file's directory as the
    base of relative paths (the embedded default file uses the state directory). Problems
    that do not stop the daemon (an open relay, a public listener without TLS...) are
    appended to ``warnings`` when it is given (``config.checks``). With ``check_contents``
    (the default) certificates, keys and DKIM keys are loaded and strategies imported, as the
    daemon will; commands that only need paths from the file (``empath status``, ``stop``,
    ``empathctl``, ``sendmail``) pass False, so a broken certificate never stops them.
    """
    from empath.config import defaults

    if base_dir is None and os.path.abspath(path) == defaults.EMBEDDED:
        base_dir = defaults.state_dir()  # whoever loads it (a reload too) gets the same paths
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", path) from None
    loader = _Loader(path, text, base_dir)
    try:
        root = loader.yaml.get_single_node()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"not valid YAML: {exc.problem}", path, line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path) from None
    cfg = loader.section(SCHEMA, root, "")
    walked_clean = not loader.errors
    try:
        _check(cast(Config, cfg), loader, root, check_contents)
    except (TypeError, AttributeError, ValueError):
        if walked_clean:
            raise
        # A value already reported as wrong stands as None; the rules that need it are
        # skipped rather than reporting a second, derived error.
    if loader.errors:
        errors = sorted(loader.errors, key=lambda e: e.line or 0)
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    values = dict(cfg._values)
    values["config_file"] = os.path.abspath(path)
    if values["hostname"] is None:
        values["hostname"] = socket.getfqdn()
    result = cast(Config, Namespace(values))
    if warnings is not None:
        from empath.config.checks import config_warnings

        warnings.extend(loader.notes)
        warnings.extend(config_warnings(result, loader.base_dir_relative))
    return result


def _check(cfg: Config, loader: _Loader, root: yaml.Node | None,
           check_contents: bool = True) -> None:
    """Rules across keys: things a single value's type cannot say (each problem recorded)."""

    def fail(dotted: str, message: str) -> None:
        loader.errors.append(loader.fail(_find_node(root, dotted), dotted, message))

    if not cfg.listeners:
        fail("listeners", "at least one listener is needed")
    seen = set()
    for i, lst in enumerate(cfg.listeners or ()):
        if lst.address is not None and lst.address in seen:
            fail(f"listeners[{i}].address", f"{lst.address} is listed twice")
        seen.add(lst.address)
        if lst.tls is None:
            continue
        cert, key = lst.tls.cert, lst.tls.key
        if (cert is None) != (key is None):
            fail(f"listeners[{i}].tls", "set both cert and key, or neither")
        if lst.mode == "smtps" and lst.tls.enabled is False:
            fail(f"listeners[{i}].tls", "mode smtps is TLS: it cannot be off")
        missing = False
        for name, file in (("cert", cert), ("key", key)):
            if file is not None and not os.path.isfile(file):
                fail(f"listeners[{i}].tls.{name}", f"no such file: {file}")
                missing = True
        if check_contents and cert is not None and key is not None and not missing:
            if _closed_to_us(loader, f"listeners[{i}].tls", cert, key):
                continue
            problem = tls_pair_problem(cert, key)
            if problem is not None:
                fail(f"listeners[{i}].tls.cert", problem)
    for i, lst in enumerate(cfg.listeners or ()):
        if lst.mode in ("submission", "smtps") and cfg.smtp.auth.password_file is None:
            fail(f"listeners[{i}].mode",
                 f"mode {lst.mode} requires AUTH: set smtp.auth.password_file")
    for domain, entry in (cfg.dkim.domains or {}).items():
        if entry.key is None:
            continue
        if not os.path.isfile(entry.key):
            fail(f"dkim.domains.{domain}.key", f"no such file: {entry.key}")
            continue
        if not check_contents or _closed_to_us(loader, f"dkim.domains.{domain}.key", entry.key):
            continue
        problem = dkim_key_problem(domain, entry)
        if problem is not None:
            fail(f"dkim.domains.{domain}.key", problem)
    pwfile = cfg.smtp.auth.password_file
    if pwfile is not None and not os.path.isfile(pwfile):
        fail("smtp.auth.password_file", f"no such file: {pwfile}")
    users = cfg.local_delivery.users
    if users is not None and not os.path.isfile(users):
        fail("local_delivery.users", f"no such file: {users}")
    ca = cfg.delivery.tls.ca_file
    if ca is not None and not os.path.isfile(ca):
        fail("delivery.tls.ca_file", f"no such file: {ca}")
    for i, mod in enumerate(cfg.smtp.modules or ()):
        if mod.name is None:
            continue
        try:
            found = importlib.util.find_spec(mod.name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            fail(f"smtp.modules[{i}].name", f"cannot import module {mod.name!r}")
    if cfg.delivery.retry_max_delay < cfg.delivery.retry_base_delay:
        fail("delivery.retry_max_delay", "must not be less than retry_base_delay")
    _check_webhooks(cfg, fail)
    if check_contents:
        _check_strategies(cfg, fail)


def _closed_to_us(loader: _Loader, key: str, *paths: str) -> bool:
    """A file the daemon reads as root (before it drops privileges) may be closed to another
    user running check-config: a warning then, not an error."""
    if os.geteuid() == 0:
        return False
    closed = [p for p in paths if not os.access(p, os.R_OK)]
    for path in closed:
        loader.notes.append(f"{loader.path}: {key}: cannot read {path}: Permission denied "
                            f"(checked as uid {os.geteuid()}; run check-config as root or as "
                            "the daemon's user)")
    return bool(closed)


def tls_pair_problem(cert: str, key: str) -> str | None:
    """Why a certificate chain and private key cannot serve TLS (None: they can)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":  # a renewal with the wrong key
            return f"the key {key} does not belong to the certificate {cert}"
        return (f"cannot load the certificate {cert} with the key {key}: "
                f"{exc.reason or exc.strerror or exc}")
    except OSError as exc:
        return f"cannot read the certificate {cert} or the key {key}: {exc.strerror or exc}"
    return None


def dkim_key_problem(domain: str, entry: DkimDomainConfig) -> str | None:
    """Why a DKIM signing key cannot be used (None: it can)."""
    from empath.dkim import DkimError, load_key

    try:
        key = load_key(domain, entry.selector, entry.algorithm, entry.key)
    except DkimError as exc:
        return str(exc).partition(": ")[2] or str(exc)
    if entry.algorithm == "rsa-sha256":
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            private = load_pem_private_key(key.private, password=None)
        except (ValueError, TypeError) as exc:
            return f"{entry.key}: not a usable private key ({exc})"
        if not isinstance(private, rsa.RSAPrivateKey):
            return f"{entry.key}: not an RSA key, but algorithm is rsa-sha256"
    return None


def _check_webhooks(cfg: Config, fail: Callable[[str, str], None]) -> None:
    """``strategy: webhook`` needs a URL, a secret file that exists, and a domain that is not
    delivered locally (local_domains go to Maildir or LMTP whatever their strategy)."""
    local = set(cfg.local_domains)
    for domain, policy in cfg.delivery.domains.items():
        key = f"delivery.domains.{domain}"
        if policy.strategy != "webhook":
            continue
        if policy.webhook.url is None:
            fail(f"{key}.webhook.url", "strategy webhook needs webhook.url")
        if domain in local:
            fail(f"{key}.strategy", f"{domain} is in local_domains and is delivered "
                       "locally; list it in relay_domains to deliver it by webhook")
        secret = policy.webhook.secret_file
        if secret is not None and not os.path.isfile(secret):
            fail(f"{key}.webhook.secret_file", f"no such file: {secret}")


def _check_strategies(cfg: Config, fail: Callable[[str, str], None]) -> None:
    """A ``package.module:Class`` strategy must import and be a DeliveryStrategy."""
    from empath.delivery.strategy import BUILTIN, StrategyError, load_class

    for domain, policy in cfg.delivery.domains.items():
        if policy.strategy in BUILTIN:
            continue
        try:
            load_class(policy.strategy)
        except StrategyError as exc:
            fail(f"delivery.domains.{domain}.strategy", str(exc))
