"""Configuration loading: every kind of mistake is an error naming file, line and key; the
shipped conf/empath.yaml is exactly the generated template; ``empath check-config`` exit codes."""

from __future__ import annotations

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
    assert capsys.readouterr().out.strip() == "ok"
    bad = tmp_path / "bad.yaml"
    bad.write_text("processes:\n  delivery: -1\n")
    assert cli.main(["check-config", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: processes.delivery:" in err


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    ok = subprocess.run([*empath_command(), "check-config", "-c", str(good)],
                        capture_output=True, text=True, timeout=30)
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok")
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
