"""The configuration's types (empath/config/typed.py): generated from the schema, true of what
the loader returns, and strict enough that mypy rejects a misspelt key, a value of the wrong
type, an impossible choice, an unchecked null and an assignment."""

from __future__ import annotations

import collections.abc
import inspect
import ipaddress
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from mypy import api as mypy_api

from empath.config import load_config, typed
from empath.config.typegen import TYPED, render_types
from empath.config.types import Address
from tests.support.daemon import REPO


def test_typed_module_is_generated_from_the_schema() -> None:
    """Stale when the schema changed and typed.py was not regenerated (typegen.write_types)."""
    assert Path(TYPED).read_text() == render_types()


def _protocols() -> dict[str, type]:
    return {name: getattr(typed, name) for name in typed.__all__}


def _hints(protocol: type) -> dict[str, Any]:
    """Each property of a generated Protocol with its return type, resolved."""
    out = {}
    for name, member in vars(protocol).items():
        if isinstance(member, property) and member.fget is not None:
            out[name] = typing.get_type_hints(member.fget, vars(typed))["return"]
    return out


def _conforms(value: Any, hint: Any, where: str, problems: list[str]) -> None:
    """Record in ``problems`` where ``value`` is not of ``hint`` (the subset of types
    typed.py uses), walking into nested sections."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if not any(_fits(value, a, where) for a in args):
            problems.append(f"{where}: {value!r} is none of {hint}")
        else:
            for a in args:
                if _fits(value, a, where):
                    _conforms(value, a, where, problems)
                    break
    elif origin is typing.Literal:
        if value not in args:
            problems.append(f"{where}: {value!r} not in {args}")
    elif origin is tuple:
        if not isinstance(value, tuple):
            problems.append(f"{where}: {type(value).__name__} is not a tuple")
            return
        for i, item in enumerate(value):
            _conforms(item, args[0], f"{where}[{i}]", problems)
    elif origin is collections.abc.Mapping:
        if not isinstance(value, collections.abc.Mapping):
            problems.append(f"{where}: {type(value).__name__} is not a mapping")
            return
        for k, v in value.items():
            _conforms(k, args[0], f"{where} key", problems)
            _conforms(v, args[1], f"{where}.{k}", problems)
    elif hint is Any:
        pass
    elif inspect.isclass(hint) and getattr(hint, "_is_protocol", False):
        hints = _hints(hint)
        present = set(value)
        declared = set(hints) | {c for c in _commented_keys(hint)}
        if present - declared - {"config_file"} or set(hints) - present:
            problems.append(f"{where}: keys {sorted(present)} but {hint.__name__} declares "
                            f"{sorted(declared)}")
        for name, sub in hints.items():
            if name in present:
                _conforms(getattr(value, name), sub, f"{where}.{name}".lstrip("."), problems)
    elif hint is float:
        if type(value) is not float:
            problems.append(f"{where}: {value!r} is {type(value).__name__}, not float")
    elif hint is int:
        if type(value) is not int:
            problems.append(f"{where}: {value!r} is {type(value).__name__}, not int")
    elif not isinstance(value, hint):
        problems.append(f"{where}: {value!r} is {type(value).__name__}, not {hint.__name__}")


def _fits(value: Any, hint: Any, where: str) -> bool:
    if hint is type(None):
        return value is None
    if value is None:
        return False
    probe: list[str] = []
    _conforms(value, hint, where, probe)
    return not probe


def _commented_keys(protocol: type) -> list[str]:
    """Keys written as comments (Python keywords such as ``global``)."""
    source = inspect.getsource(protocol)
    return [line.strip()[2:].split(":")[0] for line in source.splitlines()
            if line.strip().startswith("# ") and "Python keyword" in line]


FULL = """\
listeners:
  - address: 127.0.0.1:2525
  - address: "[::1]:2587"
    mode: submission
    tls: {cert: tls.crt, key: tls.key}
  - address: 127.0.0.1:2465
    mode: smtps
mynetworks: [127.0.0.0/8, "::1/128"]
smtp:
  auth: {password_file: passwd}
  modules:
    - {name: empath.modules.blocklist, options: {addresses: []}}
local_delivery: {lmtp: 127.0.0.1:24}
delivery:
  smarthost: relay.example.net
  rate_limits: {default: 100, global: 1000}
  dns: {resolver: 127.0.0.1}
  domains:
    example.com: {mx_override: 127.0.0.1:1025, tls: dane, max_connections: 3}
    hooks.example.net:
      strategy: webhook
      webhook: {url: "https://app.example.net/in", format: multipart}
priority:
  rules:
    - {sender: "@billing.example.com", priority: high}
    - {recipient_domain: partner.example, priority: 2}
dkim:
  domains:
    example.com: {selector: s1, key: dkim.key}
metrics: {listen_addr: 127.0.0.1:9100}
health: {listen_addr: 127.0.0.1:9101, min_free_space: 1GiB, max_queue: 10}
cluster: {url: "redis://127.0.0.1:6379", node_name: n1}
"""


def test_the_types_are_true_of_what_the_loader_returns(tmp_path: Path) -> None:
    """Every section the loader builds has exactly the keys its Protocol declares, and every
    value the declared Python type (a duration a float, a size an int, host:port an Address,
    lists tuples, choices one of the Literal's): the shipped file and one that sets the lists,
    mappings and nullable keys."""
    for name in ("tls.crt", "tls.key", "passwd", "dkim.key"):
        (tmp_path / name).write_text("")
    (tmp_path / "full.yaml").write_text(FULL)
    shipped = load_config(str(REPO / "conf" / "empath.yaml"), check_contents=False)
    full = load_config(str(tmp_path / "full.yaml"), check_contents=False)
    assert isinstance(full.listeners[1].address, Address)
    assert isinstance(full.mynetworks[1], ipaddress.IPv6Network)
    assert getattr(full.delivery.rate_limits, "global") == 1000
    for cfg in (shipped, full):
        problems: list[str] = []
        _conforms(cfg, typed.Config, "", problems)
        assert not problems, "\n".join(problems)
    # Every generated Protocol was walked with a value at least once.
    assert {p.__name__ for p in _protocols().values()} >= {"ListenerTlsConfig",
                                                           "DomainPolicyWebhookConfig",
                                                           "DkimDomainConfig", "ModuleConfig"}


def test_the_checker_catches_misspelt_keys_and_wrong_types(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mypy (strict, as tools/lint runs it) on code that reads the configuration: each
    mistake is an error on its line, and the correct reads pass."""
    monkeypatch.chdir(REPO)  # mypy finds empath/ there, installed or not
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""\
        from empath.config import Config


        def limit(cfg: Config) -> int:
            return cfg.smtp.max_conections


        def verbose(cfg: Config) -> bool:
            return cfg.log.level == "verbose"


        def banner(cfg: Config) -> str:
            return cfg.smtp.hop_limit


        def lmtp_port(cfg: Config) -> int:
            return cfg.local_delivery.lmtp.port


        def change(cfg: Config) -> None:
            cfg.smtp.max_connections = 5
        """))
    good = tmp_path / "good.py"
    good.write_text(textwrap.dedent("""\
        from empath.config import Config


        def limit(cfg: Config) -> int:
            return cfg.smtp.max_connections


        def first_port(cfg: Config) -> int:
            return cfg.listeners[0].address.port


        def lmtp_port(cfg: Config) -> int | None:
            lmtp = cfg.local_delivery.lmtp
            return lmtp.port if lmtp is not None else None


        def cooldown(cfg: Config, domain: str) -> float | None:
            policy = cfg.delivery.domains.get(domain)
            return policy.circuit_breaker.cooldown if policy is not None else None
        """))
    stdout, stderr, status = mypy_api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), str(bad), str(good)])
    assert status == 1, stdout + stderr
    errors = {int(line.split(":")[1]): line for line in stdout.splitlines()
              if line.startswith(str(bad)) and ": error:" in line}
    assert 'no attribute "max_conections"' in errors[5]
    assert "Non-overlapping equality check" in errors[9]
    assert 'got "int", expected "str"' in errors[13]
    assert 'Item "None" of "Address | None"' in errors[17]
    assert "read-only" in errors[21]
    assert str(good) not in stdout, stdout
