"""Fixtures for tests that run the real daemon (see tests/support/fixtures.py)."""

from tests.support.fixtures import daemon_factory, empath_daemon  # noqa: F401
