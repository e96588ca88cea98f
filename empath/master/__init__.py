"""The master process: the arbiter loop (``arbiter.py``), the children's start-up and lifecycle
(``child.py``), the pidfile, detaching and status file (``daemon.py``) and the switch to an
unprivileged user (``privileges.py``). The master does no mail work."""
