"""A pip-installed Empath, as a new user meets it: the sdist is built from the checkout, the
wheel from the sdist, and the wheel installed into a fresh virtualenv outside the checkout.
From an empty directory, with HOME and XDG_STATE_HOME in tmp_path and no configuration file
anywhere, ``empath check-config`` and ``empath run`` use the embedded default: SMTP on
127.0.0.1:2525 with STARTTLS (a self-signed certificate generated on first start), mail
delivered to the per-user Maildir; ``empath-mailq`` and ``empath-sendmail`` work the same way;
``EMPATH_REQUIRE_SPEEDUPS=1`` with the twins forced refuses to start.

The daemon runs in a network namespace of its own (``unshare -n``) when this user may make
one, so port 2525 never meets another Empath on the machine; every command that talks to it
runs in that namespace too (``nsenter``). The wheel is built once for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import REPO

BUILD_PY = str(REPO / ".venv" / "bin" / "python")


@dataclass
class Installed:
    venv: Path
    sdist: Path
    wheel: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env = {**os.environ, "EMPATH_REQUIRE_SPEEDUPS": "1"}  # a failed compile fails the build
    env.pop("EMPATH_NO_EXTENSIONS", None)
    _run([BUILD_PY, "setup.py", "-q", "sdist", "-d", str(root / "dist")], cwd=src, env=env)
    [sdist] = (root / "dist").glob("empath-*.tar.gz")
    _run([BUILD_PY, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "-w", str(root / "dist"), str(sdist)], cwd=root, env=env)
    [wheel] = (root / "dist").glob("empath-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _run([BUILD_PY, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
          str(wheel)], cwd=root)
    return Installed(venv, sdist, wheel)


@pytest.fixture
def user(tmp_path: Path, installed: Installed) -> Iterator[dict[str, str]]:
    """The environment of a user with an empty home, an empty working directory and no
    Empath configuration anywhere; the installed commands first on PATH. The state directory
    is short (/tmp/empath-state-*): the delivery workers' Unix sockets live under the spool,
    and a socket path may have at most 107 bytes."""
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    state = tempfile.mkdtemp(prefix="empath-state-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EMPATH_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=state,
               PATH=f"{installed.venv / 'bin'}:/usr/bin:/bin")
    yield env
    shutil.rmtree(state, ignore_errors=True)


def state_of(user: dict[str, str]) -> Path:
    return Path(user["XDG_STATE_HOME"]) / "empath"


def test_sdist_and_wheel_carry_what_an_installation_needs(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "conf/empath.init", "conf/empath.service",
                   "conf/empath.logrotate", "conf/empath.yaml", "docs/DEPLOYMENT.md",
                   "empath/config/default.yaml", "empath/_speedups/spoolio.pyx", "setup.py"):
        assert needed in names, needed
    share = installed.venv / "share"
    for needed in ("empath/empath.init", "empath/empath.service", "empath/empath.logrotate",
                   "empath/empath.yaml", "doc/empath/LICENSE", "doc/empath/DEPLOYMENT.md",
                   "doc/empath/OPERATIONS.md"):
        assert (share / needed).is_file(), needed
    assert "Apache License" in (REPO / "LICENSE").read_text()
    info = _run([installed.bin("empath"), "info"], cwd=installed.venv).stdout
    assert f"shared files: {share / 'empath'}" in info
    assert (share / "doc" / "empath" / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    for script in ("empath", "empathctl", "empath-sendmail", "empath-mailq"):
        assert os.access(installed.bin(script), os.X_OK), script
    site = _run([installed.bin("python"), "-c",
                 "import empath, empath._speedups as s, nacl, importlib.metadata as m; "
                 "print(empath.__file__); print(s.IMPLEMENTATION); "
                 "print(m.metadata('empath')['License-Expression'])"],
                cwd=installed.venv).stdout.split()
    assert site[0].startswith(str(installed.venv)), "imported from outside the virtualenv"
    assert site[1:] == ["cython", "Apache-2.0"]


def test_check_config_uses_the_embedded_default(installed: Installed, user: dict[str, str],
                                                tmp_path: Path) -> None:
    r = subprocess.run([installed.bin("empath"), "check-config"], cwd=tmp_path / "cwd",
                       env=user, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    state = state_of(user)
    lines = r.stdout.splitlines()
    assert lines[0] == f"config: the embedded default (state directory {state})"
    assert f"spool:           {state / 'spool'}" in lines
    assert f"mail:            {state / 'mail'}" in lines
    assert f"pidfile:         {state / 'run' / 'empath.pid'}" in lines
    assert "logs:            standard error" in lines
    assert not [line for line in lines if line.startswith("warning:")]
    assert lines[-1] == "ok"
    assert os.listdir(state.parent) == [], "check-config created files"
    assert os.listdir(tmp_path / "cwd") == []


def test_require_speedups_refuses_the_twins(installed: Installed, user: dict[str, str],
                                           tmp_path: Path) -> None:
    env = {**user, "EMPATH_NO_EXTENSIONS": "1", "EMPATH_REQUIRE_SPEEDUPS": "1"}
    for command in ("run", "start"):
        r = subprocess.run([installed.bin("empath"), command], cwd=tmp_path / "cwd", env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert ("empath: EMPATH_REQUIRE_SPEEDUPS is set, but the compiled speedups are not in "
                "use (EMPATH_NO_EXTENSIONS is set)") in r.stderr, r.stderr
    assert os.listdir(state_of(user).parent) == [], "a refused start created files"


class Namespace:
    """A private network namespace with loopback up, when this user may create one."""

    def __init__(self) -> None:
        self.holder: subprocess.Popen[bytes] | None = None
        try:
            self.holder = subprocess.Popen(
                ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep 600"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            return
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"up":
            self.holder.wait(10)
            self.holder = None  # no permission: the host's loopback is used

    def wrap(self, cmd: list[str]) -> list[str]:
        if self.holder is None:
            return cmd
        return ["nsenter", "-t", str(self.holder.pid), "-n", *cmd]

    def close(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(10)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    ns = Namespace()
    yield ns
    ns.close()


CLIENT = r"""
import json, smtplib, ssl, sys
cert = sys.argv[1]
ctx = ssl.create_default_context(cafile=cert)  # trust exactly the generated certificate
ctx.check_hostname = False  # smtplib checks against 127.0.0.1; the name is checked below
with smtplib.SMTP("127.0.0.1", 2525, timeout=20) as s:
    s.ehlo("client.test")
    offered = s.has_extn("starttls")
    s.starttls(context=ctx)
    peer = s.sock.getpeercert(binary_form=True)
    s.ehlo("client.test")
    s.sendmail("me@localhost", ["alice@localhost"],
               b"Subject: first try\r\n\r\nhello over TLS\r\n")
print(json.dumps({"offered": offered, "peer": peer.hex()}))
"""


def test_run_offers_starttls_and_delivers_to_the_per_user_maildir(
        installed: Installed, user: dict[str, str], tmp_path: Path, netns: Namespace) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cwd, state = tmp_path / "cwd", state_of(user)
    log = tmp_path / "empath.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(netns.wrap([installed.bin("empath"), "run"]), cwd=cwd,
                                  env=user, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening on 127.0.0.1:2525" not in log.read_text():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert f"configuration: the embedded default (state directory {state})" in text
        assert "speedups: the compiled Cython modules are in use" in text
        cert_path, key_path = state / "tls" / "selfsigned.crt", state / "tls" / "selfsigned.key"
        assert "a self-signed certificate for " in text and str(cert_path) in text
        assert "to replace it, set tls.cert and tls.key" in text
        assert key_path.stat().st_mode & 0o777 == 0o600
        r = _run(netns.wrap([installed.bin("python"), "-c", CLIENT, str(cert_path)]),
                 cwd=cwd, env=user, timeout=60)
        result = json.loads(r.stdout)
        assert result["offered"] is True
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert bytes.fromhex(result["peer"]) == cert.public_bytes(Encoding.DER)
        hostname = _run([installed.bin("python"), "-c",
                         "import socket; print(socket.getfqdn())"]).stdout.strip()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [hostname]

        new = state / "mail" / "alice" / "new"
        _wait(lambda: new.is_dir() and len(os.listdir(new)) == 1, "delivery to alice", log)
        body = (new / os.listdir(new)[0]).read_bytes()
        assert b"hello over TLS" in body and b"with ESMTPS" in body

        q = _run(netns.wrap([installed.bin("empath-mailq")]), cwd=cwd, env=user, timeout=60)
        assert "Mail queue is empty" in q.stdout
        s = subprocess.run(netns.wrap([installed.bin("empath-sendmail"), "-i", "bob"]),
                           cwd=cwd, env=user, input=b"Subject: via sendmail\n\nlocal\n",
                           capture_output=True, timeout=60)
        assert s.returncode == 0, s.stderr
        bob = state / "mail" / "bob" / "new"
        _wait(lambda: bob.is_dir() and len(os.listdir(bob)) == 1, "delivery to bob", log)
        assert b"Subject: via sendmail" in (bob / os.listdir(bob)[0]).read_bytes()
        assert os.listdir(cwd) == [], "the working directory was written to"
        # A reload reads the embedded default again, with the same state directory.
        daemon.send_signal(signal.SIGHUP)
        _wait(lambda: "configuration reloaded; starting generation 2" in log.read_text()
              or "reload failed" in log.read_text(), "the reload", log)
        assert "reload failed" not in log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
    assert code == 0, log.read_text()
    assert not (state / "run" / "empath.pid").exists()


def _wait(pred: object, what: str, log: Path | None = None, timeout: float = 60.0) -> None:
    """Poll ``pred`` (a bound for a loaded machine, not a measurement)."""
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, (f"timed out waiting for {what}"
                                             + (f"\n--- log ---\n{log.read_text()}" if log else ""))
        time.sleep(0.1)


def test_a_failed_speedups_build_fails_loudly_when_required(tmp_path: Path) -> None:
    """setup.py with no working C compiler: with EMPATH_REQUIRE_SPEEDUPS (tools/bootstrap sets
    it) the build fails with the compiler's error; without it, the notice and the twins."""
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "empath", tmp_path / "empath",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    env.pop("EMPATH_NO_EXTENSIONS", None)
    build = [BUILD_PY, "setup.py", "build_ext", "--inplace"]
    failed = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**env, "EMPATH_REQUIRE_SPEEDUPS": "1"})
    assert failed.returncode != 0
    assert "compiling the speedups failed" in failed.stderr
    assert "EMPATH_REQUIRE_SPEEDUPS is set" in failed.stderr
    assert "no-such-cc" in failed.stdout + failed.stderr  # the compiler's own error is shown
    assert not list((tmp_path / "empath" / "_speedups").glob("*.so"))
    env.pop("EMPATH_REQUIRE_SPEEDUPS", None)
    fallback = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env=env)
    assert fallback.returncode == 0, fallback.stderr
    assert "the pure-Python twins will be used" in fallback.stderr
