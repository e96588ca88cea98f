"""``empath sendmail``: the sendmail command line that cron, PHP's mail(), git send-email and
friends expect, writing the message straight into the spool (no SMTP connection).

    empath sendmail [-t] [-i|-oi] [-f sender] [-F name] [-N dsn] [-R ret] [-V envid]
                    [-C config] [-v] [--] [recipient ...]
    empath sendmail -bp          (the queue, like mailq)

The message is read from standard input (up to a line holding only ``.`` unless ``-i``/``-oi``,
else to end of file), its line endings made CRLF, From/Date/Message-ID added when missing, a
``Received: ... with local`` header put first, and it is stored with
``empath.spool.submit.store_message``: written, fdatasynced, renamed into incoming/, the
directory fsynced, the workers woken. The exit status is 0 only once the message is durable.

Exit statuses are sendmail's (sysexits.h): 64 usage (bad option, no recipients), 65 bad data
(bad address, too large), 75 temporary failure (spool missing or full: try again), 77 no
permission to write the spool, 78 configuration error. Unsupported modes (``-bs``, ``-bd``,
``-q``) are refused with 64 and a hint; ``--help`` and ``-?`` print the usage. Installed,
the ``empath-sendmail`` console script is this command (link it to /usr/sbin/sendmail; linked
as ``mailq`` it prints the queue).
"""

from __future__ import annotations

import email.utils
import errno
import os
import pwd
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from empath.config.typed import Config
from empath.ctl import submission as sub
from empath.spool import records

EX_OK, EX_USAGE, EX_DATAERR, EX_SOFTWARE = 0, 64, 65, 70
EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 75, 77, 78
PROG = "sendmail"

WITH_VALUE = set("fFrNRVBChLXOob")  # options that take a value (attached or the next word)
IGNORED_FLAGS = set("nmGU")  # accepted for compatibility, no effect here
NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


USAGE = """\
usage: sendmail [-t] [-i|-oi] [-f sender] [-F name] [-N dsn] [-R ret] [-V envid]
                [-C config] [-v] [--] [recipient ...]
       sendmail -bp            (print the mail queue, as mailq)
       sendmail --help | -?    (this text)

Reads one message from standard input and queues it in Empath's spool (no SMTP connection);
exits 0 once the message is durable.

  -t          take the recipients from To:, Cc: and Bcc: (and remove Bcc:)
  -i, -oi     a line holding only "." does not end the message (read to end of file)
  -f, -r ADDR envelope sender (default: the invoking user at the first local domain)
  -F NAME     full name for a From: header that is added
  -N DSN      never, or some of success,failure,delay (RFC 3461 NOTIFY)
  -R RET      full or hdrs: what a bounce returns (RFC 3461 RET)
  -V ENVID    envelope id (RFC 3461 ENVID)
  -C FILE     Empath configuration file (default: as the empath command)
  -v          say where the message went
  -bm         queue a message (the default); -bp: print the queue
  -n -m -G -U -oX -B -h -L -X -O are accepted and ignored

Linked as /usr/sbin/sendmail it serves cron, mail(1) and friends; linked (or called) as mailq
it prints the queue. Exit statuses (sysexits.h): 64 usage, 65 bad data, 75 try again later,
77 no permission to write the spool, 78 configuration error.
"""


class UsageError(Exception):
    """A bad command line; exit 64."""


class HelpRequested(Exception):
    """``--help`` or ``-?``: print the usage, exit 0."""


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    dot_ends_input: bool = True  # cleared by -i / -oi
    mode: str = "m"  # -bm (submit) or -bp (list the queue)
    verbose: bool = False
    notify: list[str] | None = None
    ret: str | None = None
    envid: str | None = None
    config: str | None = None


def parse_options(argv: list[str]) -> Options:
    """Sendmail-style options: bundled flags (``-ti``), values attached or in the next word
    (``-fme@x``, ``-f me@x``); options end at ``--`` or the first recipient."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("--help", "-?"):
            raise HelpRequested
        if arg == "--":
            opts.recipients += argv[i:]
            break
        if arg.startswith("--"):
            raise UsageError(f"unknown option {arg} (sendmail --help lists the options)")
        if not arg.startswith("-") or arg == "-":
            opts.recipients += argv[i - 1:]
            break
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in WITH_VALUE:
                value = arg[j:]
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"option -{letter} needs a value")
                    value = argv[i]
                    i += 1
                _set_value(opts, letter, value)
                break
            if letter == "t":
                opts.extract = True
            elif letter == "i":
                opts.dot_ends_input = False
            elif letter == "v":
                opts.verbose = True
            elif letter == "q":
                raise UsageError("-q (run the queue) is not supported: use "
                                 "'empathctl queue flush'")
            elif letter not in IGNORED_FLAGS:
                raise UsageError(f"unknown option -{letter}")
    return opts


def _set_value(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = value
    elif letter == "F":
        opts.full_name = value
    elif letter == "C":
        opts.config = value
    elif letter == "o":
        if value == "i":
            opts.dot_ends_input = False  # other -oX options (-oem, -odb, ...) mean nothing here
    elif letter == "b":
        if value in ("m", "p"):
            opts.mode = value
        elif value == "s":
            raise UsageError("-bs (SMTP on standard input) is not supported; connect to the "
                             "SMTP listener instead")
        elif value in ("d", "D"):
            raise UsageError("-bd: run the daemon with 'empath start' instead")
        else:
            raise UsageError(f"-b{value} is not supported (only -bm and -bp)")
    elif letter == "N":
        words = [w.strip().upper() for w in value.split(",") if w.strip()]
        if words != ["NEVER"] and not (words and set(words) <= NOTIFY_WORDS):
            raise UsageError(f"-N {value}: expected never, or some of success,failure,delay")
        opts.notify = words
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"-R {value}: expected full or hdrs")
        opts.ret = value.upper()
    elif letter == "V":
        opts.envid = value
    # -B (body type: detected from the data), -h, -L, -X, -O: accepted and ignored


def read_message(stream: BinaryIO, dot_ends_input: bool, limit: int) -> bytes:
    """Standard input up to end of file, or up to a line that is only ``.`` (without -i).

    Raises SubmissionError past ``limit`` bytes (the SMTP max_message_size)."""
    chunks: list[bytes] = []
    size = 0
    if dot_ends_input:
        for line in iter(stream.readline, b""):
            if line in (b".\n", b".\r\n", b"."):
                break
            chunks.append(line)
            size += len(line)
            if size > limit:
                raise sub.SubmissionError(f"message larger than the limit of {limit} bytes")
    else:
        while block := stream.read(65536):
            chunks.append(block)
            size += len(block)
            if size > limit:
                raise sub.SubmissionError(f"message larger than the limit of {limit} bytes")
    return b"".join(chunks)


def local_domain(cfg: Config) -> str:
    """The domain given to bare recipient names: the hostname when it is a local domain, else
    the first local domain (so ``root`` is delivered here), else the hostname."""
    hostname = str(cfg.hostname)
    domains = [str(d) for d in cfg.local_domains]
    if hostname.lower() in {d.lower() for d in domains} or not domains:
        return hostname
    return domains[0]


def build(opts: Options, raw: bytes, cfg: Config, *, uid: int, user: str,
          message_id: str, now: float,
          listener: str = "sendmail") -> tuple[bytes, records.Envelope]:
    """Queue data and envelope for one submission (SubmissionError when it cannot be)."""
    hostname = str(cfg.hostname)
    domain = local_domain(cfg)
    msg = sub.parse(raw)
    wanted: list[str] = []
    for arg in opts.recipients:
        wanted += sub.split_addresses(arg) or [arg]
    if opts.extract:
        # As Postfix does: header recipients are added to those of the command line.
        wanted += sub.header_recipients(msg)
        msg.remove("bcc", "resent-bcc")
    recipients = sub.unique([sub.qualify(a, domain) for a in wanted])
    if not recipients:
        raise UsageError("no recipients given" + (" and none found in To:, Cc: or Bcc:"
                                                  if opts.extract else " (or use -t)"))
    if opts.sender is None:
        sender = f"{user}@{hostname}"
    elif opts.sender.strip() in ("", "<>"):
        sender = ""
    else:
        sender = sub.qualify(opts.sender, hostname)
    date = email.utils.formatdate(now, localtime=True)
    sub.complete_headers(msg, sender=sender or f"{user}@{hostname}", full_name=opts.full_name,
                         message_id=message_id, hostname=hostname, date=date)
    data = sub.received_header(hostname=hostname, uid=uid, message_id=message_id,
                               recipients=recipients, date=date) + msg.to_bytes()
    env = sub.envelope(message_id=message_id, sender=sender, recipients=recipients, data=data,
                       notify=opts.notify, ret=opts.ret, envid=opts.envid, uid=uid, user=user,
                       now=now, listener=listener)
    return data, env


def _user() -> tuple[int, str]:
    uid = os.getuid()
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, os.environ.get("LOGNAME") or os.environ.get("USER") or f"uid{uid}"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from empath.ctl.common import CtlError, load_settings

    if argv is None and os.path.basename(sys.argv[0]) == "mailq":
        from empath.ctl import mailq  # installed as /usr/bin/mailq -> empath-sendmail

        return mailq.main(sys.argv[1:])
    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv)
    except HelpRequested:
        sys.stdout.write(USAGE)
        return EX_OK
    except UsageError as exc:
        return _fail(str(exc), EX_USAGE)
    if opts.mode == "p":
        from empath.ctl import mailq

        return mailq.main(["-c", opts.config] if opts.config else [], prog="sendmail -bp")
    try:
        cfg = load_settings(opts.config)
    except CtlError as exc:
        return _fail(str(exc), EX_CONFIG)
    return submit(opts, cfg)


def submit(opts: Options, cfg: Config) -> int:
    """Read, build and store one message; the sendmail exit status."""
    from empath.spool import Spool, new_message_id
    from empath.spool.submit import store_message

    uid, user = _user()
    message_id = new_message_id()
    try:
        raw = read_message(sys.stdin.buffer, opts.dot_ends_input, cfg.smtp.max_message_size)
        data, env = build(opts, raw, cfg, uid=uid, user=user, message_id=message_id,
                          now=time.time())
    except UsageError as exc:
        return _fail(str(exc), EX_USAGE)
    except sub.SubmissionError as exc:
        return _fail(str(exc), EX_DATAERR)
    spool = Spool(cfg.spool.path)
    try:
        store_message(spool, data, env)
    except PermissionError as exc:
        return _fail(f"permission denied writing to the spool ({exc.filename}): run as "
                     "root or the daemon's user", EX_NOPERM)
    except FileNotFoundError:
        return _fail(f"no spool at {spool.root} (the daemon creates it when it first starts)",
                     EX_TEMPFAIL)
    except OSError as exc:
        what = "the spool's filesystem is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
            else f"cannot write to the spool: {exc}"
        return _fail(f"{what}; message not queued", EX_TEMPFAIL)
    if opts.verbose:
        print(f"{PROG}: queued as {message_id} for {', '.join(env_recipients(env))}",
              file=sys.stderr)
    return EX_OK


def env_recipients(env: records.Envelope) -> list[str]:
    return [str(r["address"]) for r in env["recipients"]]


if __name__ == "__main__":
    sys.exit(main())
