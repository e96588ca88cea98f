"""Empath: a pre-fork mail transfer agent with a durable, rename-based spool."""

__version__ = "0.1.0"
