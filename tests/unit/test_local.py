"""Maildir delivery (empath/delivery/local.py) and the dispatcher's Maildir route."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from empath.config import load_config
from empath.delivery import local
from empath.delivery.dispatch import Dispatcher
from empath.delivery.state import DEFERRED, DELIVERED, FAILED
from empath.spool import MessageSource

MESSAGE = b"Received: from a by b\r\nSubject: test\r\n\r\nHello.\r\n.dot\r\n"
HEADER = b"Return-Path: <s@client.test>\r\nDelivered-To: "


def source(tmp_path: Path, data: bytes = MESSAGE, name: str = "queued") -> MessageSource:
    path = tmp_path / name
    path.write_bytes(b"HEAD" + data + b"\n{\"envelope\": true}\n")
    return MessageSource(str(path), 4, len(data))


def deliver(root: Path, address: str, src: MessageSource,
            host: str = "mx.test") -> local.LocalResult:
    return local.deliver_maildir(str(root), address, "s@client.test", src, host)


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()) if directory.exists() else []


def test_delivery_writes_one_file_into_new(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    res = deliver(root, "Alice@localhost", source(tmp_path))
    assert (res.status, res.code, res.enhanced) == (DELIVERED, 250, "2.0.0")
    assert res.ok and not res.permanent
    box = root / "alice"
    assert {p.name for p in box.iterdir()} == {"tmp", "new", "cur"}
    [msg] = files(box / "new")
    assert msg.read_bytes() == HEADER + b"Alice@localhost\r\n" + MESSAGE
    assert stat.S_IMODE(msg.stat().st_mode) == 0o600
    assert files(box / "tmp") == [] and files(box / "cur") == []
    outcome = res.outcome()
    assert (outcome.status, outcome.server) == (DELIVERED, "maildir")


@pytest.mark.parametrize("address", [
    "../etc@localhost", ".hidden@localhost", "a/b@localhost", "@localhost", "x" * 65 + "@l",
    '"a b"@localhost', "user\x00@localhost", "grüße@localhost", ".@localhost", "..@localhost"])
def test_a_name_that_cannot_be_a_directory_fails_permanently(tmp_path: Path,
                                                             address: str) -> None:
    root = tmp_path / "mail"
    res = deliver(root, address, source(tmp_path))
    assert (res.status, res.code, res.enhanced) == (FAILED, 550, "5.1.1")
    assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["queued"]


def test_names_are_unique_and_escape_the_host() -> None:
    names = {local.unique_name("mx/a:b") for _ in range(2000)}
    assert len(names) == 2000
    name = names.pop()
    assert name.endswith(".mx\\057a\\072b") and "/" not in name and ":" not in name
    seconds, micro = name.split(".")[:2]
    assert seconds.isdigit() and micro.startswith("M") and f"P{os.getpid()}Q" in micro


def test_concurrent_deliveries_to_one_mailbox_never_collide(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    src = source(tmp_path)
    errors: list[BaseException] = []

    def many() -> None:
        try:
            for _ in range(25):
                res = deliver(root, "bob@localhost", src, host="mx.test")
                assert res.ok, res.text
        except BaseException as exc:  # reported below
            errors.append(exc)

    def in_child() -> None:
        many()
        os._exit(1 if errors else 0)

    # The processes are forked before any thread starts: forking a threaded process is unsafe.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=in_child) for _ in range(2)]
    for p in procs:
        p.start()
    threads = [threading.Thread(target=many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(30)
    assert errors == [] and [p.exitcode for p in procs] == [0, 0]
    delivered = files(root / "bob" / "new")
    assert len(delivered) == 8 * 25 + 2 * 25
    assert all(p.read_bytes() == HEADER + b"bob@localhost\r\n" + MESSAGE for p in delivered)
    assert files(root / "bob" / "tmp") == []


def test_a_taken_name_in_new_is_never_replaced(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mail"
    deliver(root, "u@localhost", source(tmp_path))
    [existing] = files(root / "u" / "new")
    real = local.unique_name
    names = iter([existing.name])
    monkeypatch.setattr(local, "unique_name", lambda host: next(names, None) or real(host))
    res = deliver(root, "u@localhost", source(tmp_path, b"Subject: second\r\n\r\n"))
    assert res.ok
    delivered = files(root / "u" / "new")
    assert len(delivered) == 2
    assert existing.read_bytes().endswith(MESSAGE)
    assert files(root / "u" / "tmp") == []


def test_a_taken_name_in_tmp_is_drawn_again(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mail"
    local.ensure_maildir(str(root), "u")
    (root / "u" / "tmp" / "taken").write_bytes(b"someone else's")
    real = local.unique_name
    names = iter(["taken"])
    monkeypatch.setattr(local, "unique_name", lambda host: next(names, None) or real(host))
    assert deliver(root, "u@localhost", source(tmp_path)).ok
    assert (root / "u" / "tmp" / "taken").read_bytes() == b"someone else's"
    assert len(files(root / "u" / "new")) == 1


def test_without_hard_links_the_file_is_renamed(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    root = tmp_path / "mail"
    assert deliver(root, "u@localhost", source(tmp_path)).ok
    [msg] = files(root / "u" / "new")
    assert msg.read_bytes().endswith(MESSAGE) and files(root / "u" / "tmp") == []


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EINVAL])
def test_copy_falls_back_when_the_kernel_cannot_copy(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     code: int) -> None:
    def refuse(*args: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(local, "COPY_BLOCK", 1000)
    data = b"Subject: x\r\n\r\n" + b"0123456789" * 5000
    root = tmp_path / "mail"
    assert deliver(root, "u@localhost", source(tmp_path, data)).ok
    [msg] = files(root / "u" / "new")
    assert msg.read_bytes() == HEADER + b"u@localhost\r\n" + data


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_file_and_directories_are_fsynced_before_the_message_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", fd_path(fd)))
        real_fsync(fd)

    def link(src: str, dst: str) -> None:
        events.append(("link", dst))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    root = tmp_path / "mail"
    assert deliver(root, "u@localhost", source(tmp_path)).ok
    [msg] = files(root / "u" / "new")
    box = str(root / "u")
    tmp_file = os.path.join(box, "tmp", msg.name)
    assert events == [
        ("fsync", str(root)), ("fsync", box),           # the new mailbox and its subdirs
        ("fsync", tmp_file), ("link", str(msg)), ("fsync", os.path.join(box, "new"))]
    events.clear()
    assert deliver(root, "u@localhost", source(tmp_path)).ok
    assert [kind for kind, _ in events] == ["fsync", "link", "fsync"]


@pytest.mark.parametrize(("code", "reply"), [
    (errno.ENOSPC, (452, "4.3.1")), (errno.EDQUOT, (452, "4.2.2")), (errno.EIO, (451, "4.2.0"))])
def test_file_system_errors_defer_and_leave_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    code: int, reply: tuple[int, str]) -> None:
    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    root = tmp_path / "mail"
    local.ensure_maildir(str(root), "u")
    monkeypatch.setattr(os, "fsync", fail)
    res = deliver(root, "u@localhost", source(tmp_path))
    assert (res.status, res.code, res.enhanced) == (DEFERRED, *reply)
    assert os.strerror(code) in res.text
    assert files(root / "u" / "tmp") == [] and files(root / "u" / "new") == []


def test_a_file_where_the_mailbox_goes_defers(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    (root / "u").write_bytes(b"not a directory")
    res = deliver(root, "u@localhost", source(tmp_path))
    assert (res.status, res.code) == (DEFERRED, 451)


def test_a_short_queue_file_defers_and_cleans_up(tmp_path: Path) -> None:
    src = source(tmp_path)
    short = MessageSource(src.path, src.offset, src.length + 1000)
    root = tmp_path / "mail"
    res = deliver(root, "u@localhost", short)
    assert res.status == DEFERRED and "shorter" in res.text
    assert files(root / "u" / "tmp") == [] and files(root / "u" / "new") == []


# -- through the dispatcher ------------------------------------------------------------------
def dispatcher_config(tmp_path: Path) -> Any:
    path = tmp_path / "empath.yaml"
    path.write_text(yaml.safe_dump({"base_dir": str(tmp_path), "hostname": "mx.test",
                                    "local_domains": ["localhost"],
                                    "local_delivery": {"maildir_root": str(tmp_path / "mail")}}))
    return load_config(str(path))


def dispatch(tmp_path: Path, addresses: list[str]) -> tuple[dict[str, Any], list[Any]]:
    async def go() -> tuple[dict[str, Any], list[Any]]:
        dispatcher = Dispatcher(dispatcher_config(tmp_path))
        rcpts = [{"address": a, "orcpt": None, "notify": None} for a in addresses]
        env = {"id": "01TEST", "sender": "s@client.test", "params": {}}
        try:
            return await dispatcher.deliver(env, rcpts, source(tmp_path))
        finally:
            await dispatcher.close()

    return uvloop.run(go())


def test_dispatcher_delivers_local_domains_to_maildir(tmp_path: Path) -> None:
    out, infos = dispatch(tmp_path, ["a@localhost", "b/c@localhost"])
    assert {a: (o.status, o.code) for a, o in out.items()} == {
        "a@localhost": (DELIVERED, 250), "b/c@localhost": (FAILED, 550)}
    assert [(i["domain"], i["transport"]) for i in infos] == [("localhost", "maildir")]
    assert len(files(tmp_path / "mail" / "a" / "new")) == 1


def test_dispatcher_defers_when_maildir_delivery_breaks(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> local.LocalResult:
        raise RuntimeError("a bug")

    monkeypatch.setattr(local, "deliver_maildir", broken)
    out, _ = dispatch(tmp_path, ["a@localhost"])
    outcome = out["a@localhost"]
    assert (outcome.status, outcome.code, outcome.enhanced) == (DEFERRED, 451, "4.3.0")


@pytest.mark.parametrize(("address", "mailbox"), [
    ("Kate@localhost", "kate"), ("a.b+c-d_e@localhost", "a.b+c-d_e"),
    ("\u212aate@localhost", None),  # KELVIN SIGN: str.lower() would make it "kate"
    ("\uff4bate@localhost", None),  # FULLWIDTH k
    ("kate\n@localhost", None), ("bad%y@localhost", None), ("a/b@localhost", None),
    ('"kate"@localhost', None), (".kate@localhost", None), ("b\u00fccher@localhost", None),
])
def test_mailbox_name_is_checked_before_case_folding(address: str, mailbox: str | None) -> None:
    assert local.mailbox_name(address) == mailbox


def test_kelvin_sign_is_never_delivered_to_kate(tmp_path: Path) -> None:
    src = tmp_path / "msg"
    src.write_bytes(b"Subject: k\r\n\r\nbody\r\n")
    source = MessageSource(str(src), 0, src.stat().st_size)
    result = local.deliver_maildir(str(tmp_path / "mail"), "\u212aate@localhost", "a@b", source)
    assert result.permanent and result.code == 550
    assert not (tmp_path / "mail" / "kate").exists()


def test_local_part_key_folds_ascii_only_and_refuses_compatibility_forms() -> None:
    assert local.local_part_key("KaTe") == "kate"
    assert local.local_part_key("J\u00d6rg") == "j\u00d6rg"  # non-ASCII compared as it is
    assert local.local_part_key("\u212aate") is None
    assert local.local_part_key("\ufb01le") is None  # the "fi" ligature
