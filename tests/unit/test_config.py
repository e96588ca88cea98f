"""Configuration loading: every kind of mistake is an error naming file, line and key; the
shipped conf/empath.yaml is exactly the generated template; ``empath check-config`` exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from empath import cli
from empath.config import ConfigError, load_config
from empath.config.template import render_reference, render_template
from tests.support.daemon import REPO, empath_command

GOOD = """\
listeners:
  - address: 127.0.0.1:2525
processes:
  receivers: 2
  delivery: 1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "empath.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return info.value


@pytest.mark.parametrize(("text", "line", "key", "reason"), [
    # wrong type
    ("processes:\n  receivers: two\n", 2, "processes.receivers", "integer"),
    # out of range
    ("processes:\n  delivery: 0\n", 2, "processes.delivery", "out of range"),
    ("processes:\n  receivers: 100000\n", 2, "processes.receivers", "out of range"),
    # a boolean is not a number
    ("processes:\n  receivers: true\n", 2, "processes.receivers", "integer"),
    # duration
    ("shutdown_timeout: soon\n", 1, "shutdown_timeout", "duration"),
    ("processes:\n  heartbeat_timeout: 1s\n", 2, "processes.heartbeat_timeout", "range"),
    # size
    ("smtp:\n  max_message_size: huge\n", 2, "smtp.max_message_size", "size"),
    # address
    ("listeners:\n  - address: 127.0.0.1\n", 2, "listeners[0].address", "missing port"),
    ("listeners:\n  - address: 127.0.0.1:99999\n", 2, "listeners[0].address", "port"),
    # choice
    ("log:\n  level: loud\n", 2, "log.level", "one of"),
    ("listeners:\n  - address: 127.0.0.1:25\n    mode: carrier-pigeon\n", 3,
     "listeners[0].mode", "one of"),
    # null where a value is required
    ("spool:\n  path: null\n", 2, "spool.path", "not null"),
    # list / mapping expected
    ("local_domains: example.com\n", 1, "local_domains", "list"),
    ("listeners: {address: 127.0.0.1:25}\n", 1, "listeners", "list"),
    ("processes: 4\n", 1, "processes", "mapping"),
    # bad items
    ("local_domains: [example.com, 'not a domain!']\n", 1, "local_domains[1]", "domain"),
    ("mynetworks: [10.0.0.0/33]\n", 1, "mynetworks[0]", "network"),
    ("priority:\n  rules:\n    - sender: a@b.example\n      priority: urgent\n", 4,
     "priority.rules[0].priority", "high, normal, low or an integer"),
    ("priority:\n  rules:\n    - sender: a@b.example\n      priority: 101\n", 4,
     "priority.rules[0].priority", "-100"),
    # unknown keys, top level and nested
    ("colour: blue\n", 1, "colour", "unknown key"),
    ("processes:\n  receivers: 2\n  workers: 4\n", 3, "processes.workers", "unknown key"),
    # the same key twice
    ("pidfile: a.pid\npidfile: b.pid\n", 2, "pidfile", "twice"),
    # rules across keys
    ("listeners:\n  - address: 127.0.0.1:25\n  - address: 127.0.0.1:25\n", 3,
     "listeners[1].address", "twice"),
    ("listeners:\n  - address: 127.0.0.1:25\n    tls: {cert: /etc/hostname}\n", 3,
     "listeners[0].tls", "both"),
])
def test_bad_value_names_file_line_and_key(tmp_path: Path, text: str, line: int, key: str,
                                           reason: str) -> None:
    path = write(tmp_path, text)
    err = error_of(path)
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert reason in err.reason
    assert str(err).startswith(f"{path}:{line}: {key}: ")


def test_priority_names_are_numbers(tmp_path: Path) -> None:
    rules = "".join(f"    - sender: {name}@x.example\n      priority: {name}\n"
                    for name in ("high", "Normal", "low"))
    cfg = load_config(str(write(tmp_path, GOOD + "priority:\n  rules:\n" + rules +
                                "    - sender: n@x.example\n      priority: -7\n")))
    assert [r.priority for r in cfg.priority.rules] == [5, 0, -5, -7]


def test_missing_file(tmp_path: Path) -> None:
    err = error_of(tmp_path / "nope.yaml")
    assert err.file == str(tmp_path / "nope.yaml")
    assert "cannot read" in str(err)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "processes:\n  receivers: 2\n delivery: [1\n")
    err = error_of(path)
    assert err.file == str(path) and err.line is not None and err.line >= 3
    assert "not valid YAML" in str(err)


def test_valid_file_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, GOOD)))
    assert cfg.listeners[0].address == ("127.0.0.1", 2525)
    assert cfg.processes.receivers == 2 and cfg.processes.delivery == 1
    assert cfg.processes.heartbeat_timeout == 60.0
    assert cfg.shutdown_timeout == 30.0
    assert cfg.config_file == str(tmp_path / "empath.yaml")
    # relative paths are taken against base_dir, itself relative to the file
    assert cfg.pidfile == str(tmp_path / "var" / "run" / "empath.pid")


def test_shipped_config_is_the_generated_template() -> None:
    assert (REPO / "conf" / "empath.yaml").read_text() == render_template()
    cfg = load_config(str(REPO / "conf" / "empath.yaml"))
    assert cfg.pidfile == str(REPO / "var" / "run" / "empath.pid")


def test_check_config_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, GOOD)
    assert cli.main(["check-config", "-c", str(good)]) == 0
    out = capsys.readouterr().out.splitlines()
    # The file, then the resolved absolute paths, then "ok" alone on the last line.
    assert out[0] == f"config: {good}"
    assert out[-1] == "ok"
    assert f"spool:           {tmp_path / 'var' / 'spool'}" in out
    assert f"pidfile:         {tmp_path / 'var' / 'run' / 'empath.pid'}" in out
    assert not any(line.startswith("warning:") for line in out)
    bad = tmp_path / "bad.yaml"
    bad.write_text("processes:\n  delivery: -1\n")
    assert cli.main(["check-config", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: processes.delivery:" in err


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    ok = subprocess.run([*empath_command(), "check-config", "-c", str(good)],
                        capture_output=True, text=True, timeout=30)
    assert (ok.returncode, ok.stdout.splitlines()[-1]) == (0, "ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("log:\n  level: loud\n")
    res = subprocess.run([*empath_command(), "check-config", "-c", str(bad)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert f"{bad}:2: log.level: must be one of" in res.stderr


def test_configuration_reference_is_generated_from_the_schema() -> None:
    text = (REPO / "docs" / "CONFIGURATION.md").read_text()
    assert text == render_reference()
    # Every leaf key of the schema has a row.
    assert "| `smtp.timeouts.data_termination` |" in text
    assert "| `delivery.domains.<domain>.mx_override` |" in text


def test_commented_examples_of_the_template_are_valid(tmp_path: Path) -> None:
    """Each example block at the end of conf/empath.yaml, uncommented, with its files made,
    is a valid configuration."""
    text = render_template()
    tail = text[text.index("# Examples"):].splitlines()
    paragraphs: list[list[str]] = [[]]
    for line in tail[1:]:
        if line.strip() == "#":
            paragraphs.append([])
        elif line.startswith("# "):
            paragraphs[-1].append(line[2:])
    yaml_blocks = ["\n".join(par) for par in paragraphs
                   if par and re.fullmatch(r"[a-z_]+:", par[0])]
    assert len(yaml_blocks) == 3, yaml_blocks
    etc = tmp_path / "etc"
    for name in ("tls.crt", "tls.key", "passwd", "dkim/example.com.s2026.key"):
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / name).write_text("")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=mail.example.com", "-keyout", str(etc / "tls.key"),
                    "-out", str(etc / "tls.crt")], check=True, capture_output=True)
    subprocess.run(["openssl", "genrsa", "-out", str(etc / "dkim/example.com.s2026.key"),
                    "2048"], check=True, capture_output=True)
    for block in yaml_blocks:
        body = block.replace("/etc/empath/", f"{etc}/")
        base = "processes:\n  receivers: 2\n" if "listeners:" in body else GOOD
        cfg = load_config(str(write(tmp_path, base + body + "\n")))
        assert cfg.config_file == str(tmp_path / "empath.yaml")
        if "dkim:" in body:
            assert cfg.dkim.domains["example.com"].selector == "s2026"
        if "priority:" in body:
            assert [r.priority for r in cfg.priority.rules] == [5, -5, 2]
        if "listeners:" in body:
            assert [lst.mode for lst in cfg.listeners] == ["smtp", "submission", "smtps"]


# -- every error in one run, warnings, resolved paths (check-config) -------------------------
def test_every_error_is_reported_in_one_run(tmp_path: Path) -> None:
    bad = write(tmp_path, """\
        processes:
          receivers: two
          delivery: 0
        log:
          level: loud
        colour: blue
        listeners:
          - address: 127.0.0.1
        mynetworks: [10.0.0.0/8, not-a-network]
        """)
    err = error_of(bad)
    lines = str(err).splitlines()
    expected = [f"{bad}:2: processes.receivers:", f"{bad}:3: processes.delivery:",
                f"{bad}:5: log.level:", f"{bad}:6: colour: unknown key",
                f"{bad}:8: listeners[0].address:", f"{bad}:9: mynetworks[1]:"]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    # The first error's attributes are the exception's (callers that read one still can).
    assert (err.line, err.key) == (2, "processes.receivers")


def test_check_config_prints_every_error(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "log:\n  level: loud\nprocesses:\n  delivery: -1\n")
    assert cli.main(["check-config", "-c", str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:2: log.level:" in captured.err
    assert f"{bad}:4: processes.delivery:" in captured.err
    assert "ok" not in captured.out


def test_cross_key_rules_are_all_reported(tmp_path: Path) -> None:
    bad = write(tmp_path, f"""\
        listeners:
          - address: 127.0.0.1:25
            tls: {{cert: {tmp_path}/none.crt}}
          - address: 127.0.0.1:465
            mode: smtps
            tls: off
        local_delivery:
          users: {tmp_path}/no-users
        """)
    text = str(error_of(bad))
    assert f"{bad}:3: listeners[0].tls: set both cert and key, or neither" in text
    assert f"listeners[0].tls.cert: no such file: {tmp_path}/none.crt" in text
    assert f"{bad}:6: listeners[1].tls: mode smtps is TLS: it cannot be off" in text
    assert "listeners[1].mode: mode smtps requires AUTH" in text
    assert f"local_delivery.users: no such file: {tmp_path}/no-users" in text


def test_tls_is_on_by_default_and_off_per_listener(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, """\
        listeners:
          - address: 127.0.0.1:2525
          - address: 127.0.0.1:2526
            tls: off
          - address: 127.0.0.1:2527
            tls: {enabled: false}
        """)))
    assert [lst.tls.enabled for lst in cfg.listeners] == [True, False, False]
    assert cfg.listeners[1].tls.cert is None
    assert cfg.tls_dir == str(tmp_path / "var" / "tls")


def test_a_certificate_that_does_not_load_is_an_error(tmp_path: Path) -> None:
    from tests.support.certs import make_self_signed

    good = make_self_signed(tmp_path, "mx.example.test")
    other = make_self_signed(tmp_path / "other", "other.example.test")
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    bad = write(tmp_path, f"""\
        listeners:
          - address: 127.0.0.1:25
            tls: {{cert: {good.cert_path}, key: {other.key_path}}}
          - address: 127.0.0.1:26
            tls: {{cert: {broken}, key: {good.key_path}}}
          - address: 127.0.0.1:27
            tls: {{cert: {good.cert_path}, key: {good.key_path}}}
        """)
    lines = str(error_of(bad)).splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == (f"{bad}:3: listeners[0].tls.cert: the key {other.key_path} does not "
                        f"belong to the certificate {good.cert_path}")
    assert lines[1].startswith(f"{bad}:5: listeners[1].tls.cert: cannot load the certificate "
                               f"{broken}")


def test_a_dkim_key_that_does_not_load_is_an_error(tmp_path: Path) -> None:
    from empath.dkim import generate_key

    good = tmp_path / "good.key"
    good.write_bytes(generate_key("rsa-sha256", 1024)[0])
    garbled = tmp_path / "garbled.key"
    garbled.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    ed = tmp_path / "ed.key"
    ed.write_text("not a seed\n")
    bad = write(tmp_path, f"""\
        dkim:
          domains:
            good.example: {{selector: s1, key: {good}}}
            garbled.example: {{selector: s1, key: {garbled}}}
            ed.example: {{selector: s1, key: {ed}, algorithm: ed25519-sha256}}
        """)
    lines = str(error_of(bad)).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{bad}:4: dkim.domains.garbled.example.key: {garbled}: "
                               "not a usable private key")
    assert lines[1].startswith(f"{bad}:5: dkim.domains.ed.example.key: {ed}: "
                               "not a base64 ed25519 seed")


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert cli.main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "ok"
    return out


def test_warnings_for_open_relay_plain_public_listener_and_plain_auth(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw = tmp_path / "passwd"
    pw.write_text("")
    path = write(tmp_path, f"""\
        mynetworks: [127.0.0.0/8, 0.0.0.0/0, "::/0", 8.0.0.0/8]
        listeners:
          - address: 0.0.0.0:25
            tls: off
          - address: 127.0.0.1:2525
            tls: off
          - address: "[::]:587"
            mode: submission
        smtp:
          auth: {{password_file: {pw}, allow_plaintext: true}}
        """)
    warnings = [line for line in check_config(path, capsys) if line.startswith("warning:")]
    assert len(warnings) == 5, warnings
    assert warnings[0].startswith(f"warning: {path}: mynetworks[1]: 0.0.0.0/0 lets every "
                                  "address on the Internet relay")
    assert warnings[1].startswith(f"warning: {path}: mynetworks[2]: ::/0 lets every")
    assert warnings[2].startswith(f"warning: {path}: mynetworks[3]: 8.0.0.0/8 is wider than "
                                  "this host's own networks")
    assert warnings[3].startswith(f"warning: {path}: listeners[0].tls: 0.0.0.0:25 is on a "
                                  "public address with TLS off")
    assert warnings[4].startswith(f"warning: {path}: smtp.auth.allow_plaintext: AUTH is "
                                  "offered without TLS")


def test_open_relay_rule_uses_the_hosts_own_networks(tmp_path: Path) -> None:
    import ipaddress

    from empath.config.checks import config_warnings

    cfg = load_config(str(write(tmp_path, "mynetworks: [192.0.2.0/25, 192.0.2.0/23]\n")))
    own = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24")]
    warnings = config_warnings(cfg, own=own)
    assert len(warnings) == 1 and "mynetworks[1]: 192.0.2.0/23 is wider" in warnings[0]


def test_a_copied_file_with_a_relative_base_dir_warns(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    etc = tmp_path / "etc" / "empath"
    etc.mkdir(parents=True)
    copied = etc / "empath.yaml"
    copied.write_text((REPO / "conf" / "empath.yaml").read_text())
    out = check_config(copied, capsys)
    assert f"spool:           {tmp_path / 'etc' / 'var' / 'spool'}" in out
    warnings = [line for line in out if line.startswith("warning:")]
    assert len(warnings) == 1, out
    assert f"base_dir: relative to the file's directory, it resolves to {tmp_path / 'etc'}" \
        in warnings[0]
    assert f"spool {tmp_path / 'etc' / 'var' / 'spool'}" in warnings[0]
    # Once the paths exist (a deliberate layout), the relative base_dir is not a warning.
    for sub in ("var/spool", "var/mail", "var/run"):
        (tmp_path / "etc" / sub).mkdir(parents=True)
    assert not [line for line in check_config(copied, capsys) if line.startswith("warning:")]


def test_resolved_paths_of_the_embedded_default(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from empath.config import defaults

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("EMPATH_CONFIG", raising=False)
    monkeypatch.setattr(defaults, "CHECKOUT", str(tmp_path / "no-checkout.yaml"))
    monkeypatch.setattr(defaults, "SYSTEM_CONFIG", str(tmp_path / "no-system.yaml"))
    assert defaults.config_path() == defaults.EMBEDDED
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out.splitlines()
    state = tmp_path / "state" / "empath"
    assert out[0] == f"config: the embedded default (state directory {state})"
    assert f"spool:           {state / 'spool'}" in out
    assert f"mail:            {state / 'mail'}" in out
    assert f"pidfile:         {state / 'run' / 'empath.pid'}" in out
    assert f"self-signed TLS: {state / 'tls' / 'selfsigned.crt'}" in out
    assert out[-1] == "ok"


def test_the_embedded_default_always_resolves_to_the_state_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config of the embedded file (as a reload does) takes paths against the state
    directory, never against the package's own directory."""
    from empath.config import defaults

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = load_config(defaults.EMBEDDED)
    assert cfg.spool.path == str(tmp_path / "empath" / "spool")
    assert cfg.tls_dir == str(tmp_path / "empath" / "tls")
    assert cfg.listeners[0].address == ("127.0.0.1", 2525)
    assert cfg.listeners[0].tls.enabled is True and cfg.listeners[0].tls.cert is None
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = "/var/lib/empath" if os.geteuid() == 0 else str(
        tmp_path / "home" / ".local" / "state" / "empath")
    assert defaults.state_dir() == expected




def test_an_open_file_limit_too_low_for_max_connections_warns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from empath.config import checks

    cfg = load_config(str(write(tmp_path, "smtp: {max_connections: 5000}\n")))
    monkeypatch.setattr(checks, "open_file_limit", lambda: 4096)
    [warning] = [w for w in checks.config_warnings(cfg, own=[]) if "max_connections" in w]
    assert "5000 connections need about 10256 open files per receiver" in warning
    assert "hard limit here is 4096" in warning
    monkeypatch.setattr(checks, "open_file_limit", lambda: 1 << 20)
    assert not [w for w in checks.config_warnings(cfg, own=[]) if "max_connections" in w]
