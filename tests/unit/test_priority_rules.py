"""The priority rules of ``priority.rules`` (``message_priority``): every key a rule sets must
match, the first matching rule wins, the default is 0; names stand for numbers. Through the
configuration loader, so the listener and auth_user values are compared as the receiver will
see them."""

from __future__ import annotations

from pathlib import Path

from empath.config import load_config
from empath.smtp.events import Envelope
from empath.smtp.receiver import message_priority

RULES = """\
listeners:
  - address: 127.0.0.1:2525
  - address: 127.0.0.1:2587
priority:
  rules:
    - auth_user: newsletter
      priority: low
    - listener: 127.0.0.1:2587
      sender: "@example.org"
      priority: high
    - recipient_domain: urgent.example
      priority: 9
"""


def rules(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "empath.yaml"
    path.write_text(RULES)
    cfg = load_config(str(path))
    return cfg.priority.rules, [str(lst.address) for lst in cfg.listeners]


def env(sender: str, *rcpts: str) -> Envelope:
    return Envelope(sender=sender, recipients=[{"address": r} for r in rcpts])


def test_each_key_and_the_first_match(tmp_path: Path) -> None:
    rs, (port25, submission) = rules(tmp_path)
    mail = env("a@example.org", "x@far.example")
    assert message_priority(rs, mail, submission, None) == 5  # listener + sender
    assert message_priority(rs, mail, port25, None) == 0  # same sender, other listener
    assert message_priority(rs, env("a@other.example", "x@far.example"), submission,
                            None) == 0  # listener alone is not enough: sender must match too
    assert message_priority(rs, mail, submission, "newsletter") == -5  # first rule wins
    assert message_priority(rs, env("b@x.example", "y@Urgent.Example"), port25, None) == 9
    assert message_priority(rs, env("b@x.example", "y@calm.example"), port25, "alice") == 0


def test_auth_user_matches_case_insensitively_like_logins(tmp_path: Path) -> None:
    """passwords.verify folds the login's case, so NewsLetter is the user newsletter: the
    rule matches it too; no login (None) never matches an auth_user rule."""
    rs, (port25, _) = rules(tmp_path)
    mail = env("b@x.example", "y@calm.example")
    assert message_priority(rs, mail, port25, "NewsLetter") == -5
    assert message_priority(rs, mail, port25, "NEWSLETTER") == -5
    assert message_priority(rs, mail, port25, "newsletters") == 0
    assert message_priority(rs, mail, port25, None) == 0
