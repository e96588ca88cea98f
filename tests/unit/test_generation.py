"""The arbiter's Generation: one configuration with its sockets, child counts and number,
replaced whole on reload, rollback, a change of the receiver count and stop."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from empath.config import Config, load_config
from empath.master.arbiter import Arbiter
from empath.master.generation import Generation
from empath.master.listeners import Listener, bind_all


def config(tmp_path: Path, name: str, hosts: list[str], receivers: int,
           metrics: bool = False) -> Config:
    conf = tmp_path / f"{name}.yaml"
    conf.write_text(yaml.safe_dump({
        "base_dir": str(tmp_path), "hostname": "mta.test", "spool": {"path": "spool"},
        "listeners": [{"address": f"{h}:0", "tls": "off"} for h in hosts],
        "processes": {"receivers": receivers, "delivery": 1},
        "metrics": {"listen_addr": "127.0.0.1:0" if metrics else None}}))
    return load_config(str(conf))


@pytest.fixture
def opened() -> Iterator[list[Listener]]:
    sockets: list[Listener] = []
    yield sockets
    for lst in sockets:
        lst.close()


def bind(cfg: Config, keep: list[Listener], opened: list[Listener]) -> list[Listener]:
    out = bind_all([lc.address for lc in cfg.listeners], keep)
    opened += [lst for lst in out if lst not in opened]
    return out


def test_reload_then_rollback_swaps_every_part_together(tmp_path: Path,
                                                        opened: list[Listener]) -> None:
    # Port 0 is "any free port"; the second listener only exists in the new configuration.
    old_cfg = config(tmp_path, "old", ["127.0.0.1"], receivers=2)
    first = Generation.first(old_cfg)
    assert (first.number, first.cfg, first.sockets()) == (1, old_cfg, [])
    assert first.wanted == {"receiver": 2, "delivery": 1, "admin": 0}
    running = first.bound(bind(old_cfg, [], opened), [])
    [kept] = running.listeners

    new_cfg = config(tmp_path, "new", ["127.0.0.1", "127.0.0.2"], receivers=3,
                     metrics=True)
    new_socks = bind_all([lc.address for lc in new_cfg.listeners], [kept])
    opened += [lst for lst in new_socks if lst is not kept]
    new = running.successor(new_cfg, new_socks, [])
    assert (new.number, new.cfg) == (2, new_cfg)
    assert new.wanted == {"receiver": 3, "delivery": 1, "admin": 1}
    assert new.listeners == tuple(new_socks) and kept in new.listeners
    # The generation it replaced is a value: the reload changed nothing of it.
    assert (running.number, running.cfg, running.listeners) == (1, old_cfg, (kept,))
    assert running.wanted["receiver"] == 2
    assert running.left_behind(new) == []  # its one socket is reused

    # Rollback: the old configuration, sockets and counts come back together under a fresh
    # number; the sockets only the failed generation had are left behind.
    back = running.revived(new.number + 1)
    assert (back.number, back.cfg, back.listeners, back.wanted) == (
        3, old_cfg, (kept,), running.wanted)
    assert new.left_behind(back) == [lst for lst in new_socks if lst is not kept]


def test_receiver_count_and_stop_make_new_values(tmp_path: Path,
                                                 opened: list[Listener]) -> None:
    cfg = config(tmp_path, "c", ["127.0.0.1"], receivers=2)
    gen = Generation.first(cfg).bound(bind(cfg, [], opened), [])
    more = gen.with_receivers(4)
    assert more.wanted["receiver"] == 4 and gen.wanted["receiver"] == 2
    assert (more.number, more.cfg, more.listeners) == (gen.number, gen.cfg, gen.listeners)
    stopped = more.stopped()
    assert stopped.sockets() == [] and stopped.wanted == more.wanted
    assert more.left_behind(stopped) == list(gen.listeners)
    with pytest.raises(dataclasses.FrozenInstanceError):
        gen.number = 5  # type: ignore[misc]


def test_the_arbiter_reads_its_generation_and_cannot_change_a_part_alone(
        tmp_path: Path) -> None:
    cfg = config(tmp_path, "a", ["127.0.0.1"], receivers=2)
    arbiter = Arbiter(cfg)
    assert (arbiter.cfg, arbiter.generation, arbiter.listeners) == (cfg, 1, [])
    assert arbiter.wanted == {"receiver": 2, "delivery": 1, "admin": 0}
    for part in ("cfg", "generation", "listeners", "admin_listeners", "wanted"):
        with pytest.raises(AttributeError):
            setattr(arbiter, part, None)
    arbiter.current = arbiter.current.with_receivers(3).revived(7)
    assert (arbiter.generation, arbiter.wanted["receiver"]) == (7, 3)


def rewrite(cfg: Config, **changes: Any) -> None:
    """Change keys of the file ``cfg`` was loaded from (the next reload reads them)."""
    path = Path(cfg.config_file)
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))


def test_a_reload_that_moves_the_spool_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, "a", ["127.0.0.1"], receivers=2)
    arbiter = Arbiter(cfg)
    before = arbiter.current
    rewrite(cfg, spool={"path": "elsewhere"})
    arbiter.reloads.reload()
    assert arbiter.current is before and arbiter.reloads.previous is None
    last = arbiter.reloads.last
    assert last is not None and (last["ok"], last["generation"]) == (False, 1)
    assert "spool.path changed" in last["error"]


def test_a_valid_reload_swaps_the_generation_and_closes_old_sockets_once_unused(
        tmp_path: Path, opened: list[Listener]) -> None:
    cfg = config(tmp_path, "a", ["127.0.0.1"], receivers=2)
    arbiter = Arbiter(cfg)
    arbiter.current = arbiter.current.bound(bind(cfg, [], opened), [])
    [old_socket] = arbiter.listeners
    rewrite(cfg, listeners=[{"address": "127.0.0.2:0", "tls": "off"}],
            processes={"receivers": 3, "delivery": 1})
    arbiter.reloads.reload()
    opened += arbiter.listeners
    assert (arbiter.generation, arbiter.wanted["receiver"]) == (2, 3)
    assert [lst.bound.host for lst in arbiter.listeners] == ["127.0.0.2"]
    previous = arbiter.reloads.previous
    assert previous is not None and previous.number == 1
    assert arbiter.reloads.last is not None and arbiter.reloads.last["ok"] is None
    # The old socket stays open while an older generation might still use it; with no child
    # of an older generation left, it is closed.
    assert arbiter.reloads.left_behind == [old_socket]
    arbiter.reloads.close_left_behind()
    assert arbiter.reloads.left_behind == [] and old_socket.sock.fileno() == -1
    # No child of generation 1 runs: there is nothing to roll back to.
    assert not arbiter.reloads.roll_back("generation 2 did not boot")
    assert arbiter.generation == 2
