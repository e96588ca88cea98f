"""The configuration schema: one declarative table of every key, its type, default and meaning.

The loader validates a YAML file against this table, and ``empath config-template`` writes
``conf/empath.yaml`` from it, so the shipped file's comments are the documentation of each key and
cannot drift from what the loader accepts. Nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from empath.config.types import (
    URL,
    Bool,
    DNSSECMode,
    Domain,
    Duration,
    Float,
    HostPort,
    Int,
    ListOf,
    Mapping,
    Network,
    Path,
    Priority,
    Size,
    Str,
    StrategyName,
    ValueType,
)


@dataclass(frozen=True)
class Key:
    """One scalar (or list of scalars) setting."""

    name: str
    type: ValueType
    default: Any
    doc: str
    nullable: bool = False
    # What the generated conf/empath.yaml writes, when it differs from the default.
    sample: Any = field(default=None)
    has_sample: bool = False
    # Null in the file, but never in the loaded configuration: load_config fills it in
    # (hostname: this machine's name), so its type (config/typed.py) is not optional.
    filled_at_load: bool = False


@dataclass(frozen=True)
class Section:
    """A mapping of named keys; ``many`` makes it a list of such mappings (``listeners``) and
    ``keyed_by`` a mapping from names of that type to such mappings (``delivery.domains``)."""

    name: str
    doc: str
    children: tuple[Key | Section, ...]
    many: bool = False
    keyed_by: ValueType | None = None
    default: Any = None  # for many / keyed_by: the default list / mapping
    sample: Any = None
    # ``tls: off`` (or false) for the whole section: its defaults with this Bool key false.
    off_key: str | None = None
    # The name of its class in config/typed.py (else made from its dotted name).
    type_name: str | None = None

    def child(self, name: str) -> Key | Section | None:
        for c in self.children:
            if c.name == name:
                return c
        return None


def sample(name: str, type_: ValueType, default: Any, doc: str, value: Any,
           nullable: bool = False) -> Key:
    """A key whose shipped value (``value``) differs from its built-in default."""
    return Key(name, type_, default, doc, nullable, value, True)


SYSLOG_FACILITIES = ("mail", "daemon", "user", "local0", "local1", "local2", "local3",
                     "local4", "local5", "local6", "local7")
TLS_POLICIES = ("opportunistic", "required", "disabled", "dane")
_POLICY_CHOICES = TLS_POLICIES
WEBHOOK_FORMATS = ("json", "multipart")


def _webhook_url() -> URL:
    """webhook.url: http:// or https://, no credentials."""
    return URL(("http", "https"), "an http:// or https:// URL",
               "no credentials in the URL: they would sit in the configuration and the logs; "
               "the receiver checks webhook.secret_file's signature instead")


def _redis_url() -> URL:
    """cluster.url: redis:// or rediss:// (TLS), no password."""
    return URL(("redis", "rediss"), "a redis:// or rediss:// URL",
               "no password in the URL: it would sit in the configuration and the logs; use "
               "cluster.password_file", user_allowed=True)


LISTENER = (
    Key("address", HostPort(), None, "host:port to listen on ([::1]:25 for IPv6)."),
    Key("mode", Str(("smtp", "submission", "smtps")), "smtp",
        "smtp: SMTP with STARTTLS (unless tls is off); submission: as smtp, for clients; "
        "smtps: implicit TLS (RFC 8314) on connect."),
    Section("tls", "TLS of this listener: STARTTLS (implicit TLS for smtps). On by default: "
            "with no cert and key, a self-signed certificate for hostname is generated in "
            "tls_dir on first start. `tls: off` (or enabled: false) turns it off for this "
            "listener.", (
        Key("enabled", Bool(), True,
            "Offer TLS on this listener (false: plain SMTP only; not for smtps)."),
        Key("cert", Path(), None,
            "PEM certificate chain file; null: the generated self-signed one.", nullable=True),
        Key("key", Path(), None, "PEM private key file; both or neither.", nullable=True),
    ), off_key="enabled"),
)

DOMAIN_POLICY = (
    Key("mx_override", HostPort(default_port=25), None,
        "Send this domain's mail to host:port instead of its MX hosts.", nullable=True),
    Key("tls", Str(_POLICY_CHOICES), None,
        "TLS policy for this domain (opportunistic | required | disabled | dane); dane: "
        "DANE is mandatory (RFC 7672): only MX hosts whose DNSSEC-validated TLSA records "
        "authenticate their certificate get the mail, anything less is a temporary failure. "
        "null: the default.", nullable=True),
    Key("dnssec", DNSSECMode(), None,
        "DNSSEC mode for this domain's lookups (off | log | enforce, as delivery.dns.dnssec); "
        "null: the default.", nullable=True),
    Key("accept_invalid_certs", Bool(), None,
        "Accept certificates that do not verify, for this domain (wins over the global "
        "setting); null: the global setting.", nullable=True),
    Key("max_connections", Int(1, 10000), None,
        "Most simultaneous connections to this domain, all delivery workers together; "
        "null: the default.", nullable=True),
    Key("rate_limit", Int(1), None,
        "Most messages per minute to this domain, all delivery workers together; null: the "
        "default.", nullable=True),
    Key("strategy", StrategyName(), "smtp",
        "How this domain's mail is delivered: smtp (its MX hosts, or mx_override), "
        "webhook: one HTTP POST per message to webhook.url (docs/WEBHOOKS.md; the other "
        "keys here are for SMTP and do not apply), or package.module:Class, a "
        "DeliveryStrategy subclass (docs/MODULES.md). Not for local_domains."),
    Key("strategy_options", Mapping(), {},
        "Settings passed to a package.module:Class strategy's constructor."),
    Key("strategy_timeout", Duration(1), 600.0,
        "Longest one delivery of this domain's recipients may take, whatever the strategy; "
        "then they are deferred."),
    Section("webhook", "The HTTP endpoint of strategy webhook (docs/WEBHOOKS.md). 2xx: "
            "delivered; 408, 429, 5xx, 3xx, timeouts and connection errors: retried on the "
            "normal schedule; any other 4xx: failed (bounced).", (
                Key("url", _webhook_url(), None,
                    "http:// or https:// URL the messages are POSTed to (https: verified "
                    "against delivery.tls.ca_file, else the system store; no redirects "
                    "followed); required with strategy webhook.", nullable=True),
                Key("secret_file", Path(), None,
                    "File holding the HMAC-SHA256 key (its first line) the requests are "
                    "signed with (X-Empath-Signature, X-Empath-Timestamp); readable by user; "
                    "kept out of this file so the secret is not copied with it. null: "
                    "unsigned.", nullable=True),
                Key("timeout", Duration(0.1, 3600), 30.0,
                    "The whole request: connecting, sending the message and the response's "
                    "status; then the recipients are deferred."),
                Key("format", Str(WEBHOOK_FORMATS), "json",
                    "json: one JSON object, the message base64-encoded in it; multipart: "
                    "multipart/form-data with an envelope part (JSON) and a message part "
                    "(message/rfc822, raw). Both are streamed from the spool."),
            )),
    Section("circuit_breaker", "This domain's circuit breaker; null keys: the defaults "
            "(delivery.circuit_breaker).", (
                Key("failures", Int(0, 100000), None,
                    "Deliveries in a row that reach no server before the breaker opens; 0: "
                    "off.", nullable=True),
                Key("cooldown", Duration(1), None,
                    "How long an open breaker defers without trying.", nullable=True),
            )),
)

DOMAINS_SAMPLE = """\
# example.com:
#   mx_override: 127.0.0.1:1025
#   tls: required
#   max_connections: 10
#   rate_limit: 200
# hooks.example.net:
#   strategy: webhook
#   webhook:
#     url: https://app.example.net/incoming-mail
#     secret_file: /etc/empath/webhook.secret
#     format: json
"""

SCHEMA = Section("", "Empath configuration.", (
    sample("base_dir", Path(), ".",
           "Directory that relative paths below are taken against; relative to this file's "
           "directory. The shipped file uses the checkout (..).", ".."),
    Key("hostname", Str(), None,
        "Name used in the SMTP greeting, Received: headers, EHLO and bounces; null: this "
        "machine's fully qualified name.", nullable=True, filled_at_load=True),
    Key("user", Str(), None,
        "User to run as after binding the listeners (the master must start as root); null: "
        "stay as the starting user.", nullable=True),
    Key("group", Str(), None, "Group to run as; null: the user's primary group.",
        nullable=True),
    Key("pidfile", Path(), "var/run/empath.pid", "The master's pidfile."),
    Key("tls_dir", Path(), "var/tls",
        "Where the master keeps the self-signed certificate (selfsigned.crt) and key "
        "(selfsigned.key, mode 0600) it generates on first start for listeners with TLS on "
        "and no tls.cert; set the listeners' tls.cert and tls.key to replace it."),
    Key("shutdown_timeout", Duration(0, 3600), 30.0,
        "On SIGTERM/SIGINT, how long sessions and deliveries may take to finish before the "
        "children are killed (messages are never lost: unfinished work stays in the spool)."),
    Section("log", "Logging.", (
        Key("file", Path(), None, "Log file; null: standard error. SIGUSR1 reopens it.",
            nullable=True),
        Key("level", Str(("debug", "info", "warning", "error"), lower=True), "info",
            "Least severe level written."),
        Key("format", Str(("text", "json"), lower=True), "text",
            "text: one human-readable line per record; json: one JSON object per line "
            "(time, level, logger, pid, message, queue_id when the line is about a message)."),
        Key("syslog", Str(SYSLOG_FACILITIES, lower=True), None,
            "Send records to syslog with this facility (mail, daemon, local0..local7) instead "
            "of log.file or standard error; null: off.", nullable=True),
        Key("syslog_socket", Path(), "/dev/log", "The syslog daemon's Unix socket."),
    )),
    Section("listeners", "SMTP listeners; the master binds them all before forking.",
            LISTENER, many=True, type_name="ListenerConfig",
            default=[{"address": "127.0.0.1:2525", "mode": "smtp",
                      "tls": {"cert": None, "key": None}}]),
    Section("processes", "How many of each child process the master keeps running.", (
        Key("receivers", Int(1, 32), 2,
            "SMTP receiver processes sharing the listening sockets (SIGTTIN/SIGTTOU "
            "add/remove one); at most 32, so that two generations fit the shared "
            "connection table during a reload."),
        Key("delivery", Int(1, 256), 2, "Delivery worker processes."),
        Key("heartbeat_timeout", Duration(2, 3600), 60.0,
            "A child whose event loop has not reported to the master for this long is "
            "killed and replaced."),
    )),
    Section("spool", "The queue directory: the only shared state between processes.", (
        Key("path", Path(), "var/spool", "Spool directory (created if missing)."),
        Key("min_free_space", Size(), 100 * 1024 * 1024,
            "Answer 452 to new mail while the spool's filesystem has less free space."),
        Key("sync", Str(("file", "filesystem")), "file",
            "How a received message is made durable before its 250. file: fdatasync of "
            "each message file, then one fsync of incoming/ per batch; safe on any "
            "filesystem. filesystem: no per-file sync, one syncfs(2) per batch; fewer "
            "flushes and less CPU, but it also flushes everything else written to that "
            "filesystem, so use it only for a spool on a filesystem of its own."),
        Key("recycle_files", Int(0, 1_000_000), 4000,
            "Files of delivered messages kept in recycle/ for receivers to overwrite with "
            "new messages, so a message costs no inode allocation (those over 64 KiB are "
            "emptied first, so at most 64 KiB of disk each); 0 unlinks them at once. Enough "
            "for the receivers' ready slots (1,024 each) and a second of peak traffic."),
    )),
    Key("local_domains", ListOf(Domain()), ["localhost"],
        "Domains delivered here (local_delivery)."),
    Key("relay_domains", ListOf(Domain()), [],
        "Other domains accepted from anyone and relayed onward."),
    Key("mynetworks", ListOf(Network()), ["127.0.0.0/8", "::1/128"],
        "Clients that may relay to any domain."),
    Section("smtp", "The SMTP receiver.", (
        Key("banner", Str(), "ESMTP Empath", "Text after the hostname in the 220 greeting."),
        Key("max_message_size", Size(1024), 35 * 1000 * 1000,
            "Largest message accepted (advertised as SIZE, RFC 1870); larger ones get 552."),
        Key("max_recipients", Int(1, 100000), 100,
            "Recipients per message; more get 452 (RFC 5321 §4.5.3.1.8 asks for at least 100)."),
        Key("max_line_length", Int(1000, 1000000), 1000,
            "Longest text line in DATA including CRLF (RFC 5321 §4.5.3.1.6: 1000)."),
        Key("max_command_line", Int(512, 65536), 512,
            "Longest command line including CRLF (RFC 5321 §4.5.3.1.4: 512; longer "
            "lines get 500)."),
        Key("max_connections", Int(1, 1000000), 2000,
            "Simultaneous connections of the whole daemon, every receiver process together "
            "(each takes new ones only up to its share, so waiting clients go to one with "
            "room); beyond it, 421. The receivers raise their open-file limit to about twice "
            "this, and warn when they cannot."),
        Key("max_connections_per_ip", Int(1, 1000000), 50,
            "Simultaneous connections from one client address, every receiver process "
            "together; beyond it, 421."),
        Key("max_errors", Int(1, 1000), 10,
            "Errors (bad commands, rejected recipients) before the client is dropped with 421."),
        Key("bare_eol", Str(("reject", "normalize")), "reject",
            "A bare CR or LF in DATA (SMTP smuggling): reject the message with 550, or "
            "normalize it to CRLF. A bare line ending never ends the data either way."),
        Key("hop_limit", Int(1, 1000), 50,
            "Received: header fields an incoming message may carry; a message with more is "
            "in a mail loop and is refused after its data with 554 5.4.6 (Postfix: "
            "hopcount_limit)."),
        Key("in_flow_delay", Duration(0, 60), 1.0,
            "When delivery falls behind (more than in_flow_backlog messages not yet claimed "
            "by a delivery worker), each MAIL FROM waits up to this long for the backlog to "
            "drop, as Postfix's in_flow_delay: senders slow down instead of the queue "
            "growing. 0: off."),
        Key("in_flow_backlog", Int(1, 10_000_000), 1000,
            "Messages waiting in incoming/ above which in_flow_delay applies."),
        Key("in_flow_lag", Duration(0, 1), 0.003,
            "in_flow_delay applies too while a receiver's event loop is saturated: each "
            "spool store it settles later than this on average lowers its limit on messages "
            "under way (each in time raises it), and a MAIL FROM over the limit waits until "
            "one is answered, so the final dot's 250 stays quick. 0: only the backlog "
            "counts."),
        Key("greeting_delay", Duration(0, 60), 0.0,
            "Wait this long before the 220 greeting; a client that talks first is "
            "rejected with 554 (early talker). 0 still rejects bytes sent before the greeting."),
        Key("require_helo", Bool(), True, "Require HELO/EHLO before MAIL."),
        Key("dedup_window", Duration(0), 0.0,
            "Duplicate suppression: a message whose Message-ID, sender, recipients and data "
            "match one accepted within this window gets 250 but is not stored again "
            "(remembered in the spool, so across restarts); 0: off."),
        Section("timeouts", "Server timeouts (RFC 5321 §4.5.3.2); 421 when one expires.", (
            Key("command", Duration(1), 300.0, "Waiting for the next command."),
            Key("data_init", Duration(1), 120.0, "After 354, waiting for the first data."),
            Key("data_block", Duration(1), 180.0, "Between data chunks."),
            Key("data_termination", Duration(1), 600.0,
                "After the final dot, the longest the on_data module hooks may take (451 "
                "when they have not answered). The spool write is never cut short: the "
                "message is stored and acknowledged, or refused."),
            Key("connection", Duration(1), 1800.0, "Whole connection lifetime."),
        )),
        Section("auth", "SMTP AUTH (RFC 4954) on submission and smtps listeners.", (
            Key("password_file", Path(), None,
                "File of user:argon2-hash lines (empathctl passwd adds users); needed by "
                "submission and smtps listeners.", nullable=True),
            Key("allow_plaintext", Bool(), False,
                "Offer AUTH without TLS (only for trusted networks; never on the Internet)."),
            Key("max_failures", Int(1, 1000), 5,
                "Failed AUTH attempts per client address within failure_window before its "
                "connections are dropped with 421."),
            Key("failure_window", Duration(1), 600.0, "Window for max_failures."),
            Key("require_sender_match", Bool(), False,
                "Refuse MAIL FROM whose domain is not the authenticated user's (its domain, or "
                "a local domain for a bare user name) with 553 5.7.1."),
        )),
        Section("modules", "Modules called on SMTP events (docs/MODULES.md), in order.", (
            Key("name", Str(), None, "Importable module path, e.g. empath.modules.blocklist."),
            Key("options", Mapping(), {}, "Options passed to the module's setup()."),
        ), many=True, default=[], type_name="ModuleConfig"),
    )),
    Section("local_delivery", "Delivery for local_domains.", (
        Key("maildir_root", Path(), "var/mail",
            "Mail for user@<local domain> goes to <maildir_root>/<user>/{tmp,new,cur}."),
        Key("lmtp", HostPort(), None,
            "Deliver to this LMTP server (RFC 2033) instead of Maildir.", nullable=True),
        Key("users", Path(), None,
            "File of known local users, one per line; others are rejected at RCPT (550). "
            "null: see unknown_users.", nullable=True),
        Key("unknown_users", Str(("reject", "accept")), None,
            "Without a users file: reject (550 at RCPT) local users that are neither system "
            "users nor have a Maildir under maildir_root (postmaster is always accepted), or "
            "accept any (each new name gets a Maildir); null: reject, unless every listener "
            "is on a loopback address. Names Maildir delivery cannot use (%, !, /, quoted, "
            "non-ASCII) are refused at RCPT either way.", nullable=True),
    )),
    Section("delivery", "Delivery workers.", (
        Key("max_attempts", Int(1, 10000), 25, "Attempts before a message fails."),
        Key("retry_base_delay", Duration(1), 60.0,
            "Retry delay: min(base * 2^(n-1), max) * (1 +/- jitter)."),
        Key("retry_max_delay", Duration(1), 86400.0, "Upper bound of the retry delay."),
        Key("retry_jitter_factor", Float(0, 1), 0.2, "Random spread of retry delays."),
        Key("message_expiration", Duration(1), 5 * 86400.0,
            "A message still undelivered after this long expires (bounced)."),
        Key("delay_warning", Duration(0), 4 * 3600.0,
            "Send the sender one delay notice after this long (RFC 3461 NOTIFY=DELAY); "
            "0: never."),
        Key("max_parallel_deliveries", Int(1, 100000), 100,
            "Messages in flight at once per delivery worker. A message that only waits for "
            "a destination's connection slot or rate token holds none (up to 10 such "
            "messages per slot are kept besides)."),
        Key("failed_retention", Duration(0), 86400.0,
            "How long an undeliverable message from the null sender (a bounce that could "
            "not be delivered: a double bounce) is kept in failed/ for an operator before it "
            "is dropped with a log line and an audit record ('dropped'); 0: dropped at once. "
            "Bounds how much backscatter the spool can hold to this much time's worth."),
        Key("queue_scan_interval", Duration(0.1), 10.0,
            "How often workers rescan the spool (they are also woken on each new message)."),
        Key("smarthost", HostPort(default_port=25), None,
            "Send all remote mail through this host:port instead of MX hosts.", nullable=True),
        Key("port", Int(1, 65535), 25, "TCP port of MX hosts; tests use another."),
        Key("helo_name", Str(), None, "Name sent in EHLO; null: hostname.", nullable=True),
        Key("mx_address_limit", Int(1, 1000), 5,
            "Most server addresses (of all MX hosts together) tried per delivery attempt "
            "(Postfix's smtp_mx_address_limit)."),
        Key("mx_session_limit", Int(1, 1000), 2,
            "Most SMTP sessions (connections a server answered) per delivery attempt "
            "(Postfix's smtp_mx_session_limit)."),
        Key("bounce_size_limit", Size(), 50000,
            "Largest original message returned whole in a non-delivery notice (RET=FULL); "
            "above it only its headers (Postfix's bounce_size_limit)."),
        Key("max_connections", Int(1, 10000), 20,
            "Default most simultaneous connections per destination domain, all delivery "
            "workers together: each worker gets its share (20 over 3 workers: 7, 7, 6; a "
            "limit below processes.delivery still gives each worker 1)."),
        Section("circuit_breaker", "Per destination domain (per delivery worker): after "
                "failures deliveries in a row that reach no server (connections refused, timed "
                "out or closed; 4xx/5xx greeting or EHLO), deliveries are deferred at once, "
                "without connecting, for cooldown; then one probe delivery is let through, and "
                "the breaker closes when it reaches a server.", (
                    Key("failures", Int(0, 100000), 5,
                        "Deliveries in a row that reach no server before the breaker opens; "
                        "0: off."),
                    Key("cooldown", Duration(1), 300.0,
                        "How long an open breaker defers without trying."),
                )),
        Section("connection_reuse", "Keep connections open for the next message.", (
            Key("max_idle", Duration(0), 30.0, "Close an unused connection after this long."),
            Key("max_messages", Int(1, 100000), 100, "Messages per connection."),
        )),
        Section("timeouts", "Client timeouts per operation (RFC 5321 §4.5.3.2).", (
            Key("connect", Duration(0.1), 30.0, "TCP connect."),
            Key("banner", Duration(0.1), 300.0, "Waiting for the 220 greeting."),
            Key("ehlo", Duration(0.1), 300.0, "EHLO/HELO reply."),
            Key("starttls", Duration(0.1), 120.0, "STARTTLS reply and the TLS handshake."),
            Key("mail", Duration(0.1), 300.0, "MAIL reply."),
            Key("rcpt", Duration(0.1), 300.0, "RCPT reply."),
            Key("data_init", Duration(0.1), 120.0, "DATA reply (354)."),
            Key("data_block", Duration(0.1), 180.0, "Sending each block of data."),
            Key("data_termination", Duration(0.1), 600.0, "Reply after the final dot."),
            Key("quit", Duration(0.1), 30.0, "QUIT reply."),
            Key("hooks", Duration(0.1), 30.0,
                "Each delivery-side module hook (docs/MODULES.md); a before_delivery hook "
                "that does not answer defers the attempt."),
        )),
        Section("dns", "MX resolution.", (
            Key("resolver", HostPort(default_port=53), None,
                "DNS server host:port; null: the system resolver (/etc/resolv.conf).",
                nullable=True),
            Key("timeout", Duration(0.1), 10.0, "Lifetime of one lookup."),
            Key("cache_ttl", Duration(0), 300.0, "Longest time an answer is cached "
                "(the record's TTL wins when shorter)."),
            Key("cache_size", Int(0, 10000000), 10000, "Most cached answers."),
            Key("dnssec", DNSSECMode(), "off",
                "DNSSEC: the resolver must then be a validating resolver reached over a path "
                "you trust (a local unbound); its AD bit says whether an answer was validated. "
                "off: not consulted, no DANE. log: every MX, A/AAAA and TLSA lookup is judged "
                "secure, insecure (AD=0 and the resolver proves the zone unsigned: a validated "
                "denial of DS up the tree), unvalidated (AD=0 without that proof) or bogus "
                "(SERVFAIL, answered with checking disabled), recorded in the attempt "
                "history; DANE is used where TLSA records are secure. enforce: as log, and an "
                "unvalidated answer is a temporary failure. A bogus answer is a temporary "
                "failure in every mode."),
        )),
        Section("tls", "Outbound TLS.", (
            Key("default_policy", Str(_POLICY_CHOICES), "opportunistic",
                "opportunistic: STARTTLS when offered, else plain; required: never plain "
                "(temporary failure instead); disabled: never STARTTLS (and no DANE); dane: "
                "DANE mandatory for every domain. Except under disabled, an MX host with "
                "DNSSEC-validated TLSA records (dns.dnssec log or enforce) gets DANE: "
                "STARTTLS is mandatory and its certificate must match the TLSA records "
                "(ca_file and accept_invalid_certs do not apply), else a temporary failure."),
            Key("accept_invalid_certs", Bool(), False,
                "Deliver even when the server certificate does not verify (logged)."),
            Key("ca_file", Path(), None, "CA bundle; null: the system store.", nullable=True),
        )),
        Section("rate_limits", "Rate limits.", (
            Key("default", Int(1), None,
                "Messages per minute per destination domain, all delivery workers together "
                "(each worker sends its share: a token bucket refilled at the rate divided by "
                "processes.delivery); null: unlimited.", nullable=True),
            Key("global", Int(1), None,
                "Messages per minute to all remote destinations together: this node's "
                "delivery workers together, or with cluster.url set every node of the fleet "
                "together; null: unlimited.", nullable=True),
        )),
        Section("mta_sts", "MTA-STS (RFC 8461): domains that publish an _mta-sts TXT record "
                "and a policy at https://mta-sts.<domain>/.well-known/mta-sts.txt. Policy "
                "mode enforce: only MX hosts the policy names, with STARTTLS and a "
                "certificate valid for the MX name (tls.ca_file or the system store), else a "
                "temporary failure; testing: failures are logged and recorded, delivery "
                "goes on. Not for mx_override, smarthost, or a domain whose tls is disabled "
                "or dane; DANE wins where a host has DNSSEC-validated TLSA records.", (
                    Key("enabled", Bool(), False, "Look up and apply MTA-STS policies."),
                    Key("port", Int(1, 65535), 443,
                        "HTTPS port of the policy hosts; tests use another."),
                    Key("ca_file", Path(), None,
                        "CA bundle for the policy hosts' certificates; null: tls.ca_file, else "
                        "the system store.", nullable=True),
                    Key("timeout", Duration(0.1), 20.0,
                        "Fetching one policy (connection, TLS and the response)."),
                    Key("cache_size", Int(0, 10000000), 10000,
                        "Most policies cached per worker (each for its max_age)."),
                )),
        Section("domains", "Per-destination-domain settings.", DOMAIN_POLICY,
                keyed_by=Domain(), default={}, type_name="DomainPolicyConfig",
                sample=DOMAINS_SAMPLE),
    )),
    Section("priority", "Delivery order. Workers take waiting messages oldest first; a "
            "message's priority moves its place by priority x step, so high priority goes "
            "first and low priority still goes out at most (highest - lowest) x step after "
            "it would have without priorities (aging: never starved).", (
        Key("step", Duration(0), 60.0, "How far one priority point moves a message."),
        Section("rules", "First matching rule sets a message's priority (else 0; a module "
                "may set ctx.priority in on_data).", (
            Key("sender", Str(lower=True), None,
                "Envelope sender address, or @domain.", nullable=True),
            Key("recipient_domain", Domain(), None,
                "Matches when any recipient is at this domain.", nullable=True),
            Key("listener", HostPort(), None, "Received on this listener.", nullable=True),
            Key("auth_user", Str(), None, "Submitted by this authenticated user.",
                nullable=True),
            Key("priority", Priority(), None,
                "The priority: high (5), normal (0), low (-5), or a number from -100 to 100."),
        ), many=True, default=[], type_name="PriorityRuleConfig"),
    )),
    Section("dkim", "DKIM signing (RFC 6376, 8463) of mail from trusted clients, at receipt.", (
        Key("canonicalization", Str(("relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                                     "simple/simple")), "relaxed/relaxed",
            "Header/body canonicalization."),
        Key("headers", ListOf(Str(lower=True)), [],
            "Header fields to sign; empty: the RFC 6376 §5.4.1 set (From, To, Subject, Date, "
            "Message-ID, ...)."),
        Section("domains", "Signing keys by From: domain; mail from mynetworks or "
                "authenticated clients whose From: domain is listed is signed (an "
                "authenticated user's only for domains it may send as: see "
                "require_sender_match).", (
                    Key("selector", Str(pattern=r"^[A-Za-z0-9._-]{1,63}$"), None,
                        "Selector (the DNS name is <selector>._domainkey.<domain>)."),
                    Key("key", Path(), None,
                        "Private key file (empathctl dkim keygen writes one)."),
                    Key("algorithm", Str(("rsa-sha256", "ed25519-sha256")), "rsa-sha256",
                        "Signature algorithm of the key."),
                ), keyed_by=Domain(), default={}, type_name="DkimDomainConfig",
                sample="# example.com:\n#   selector: s2026\n"
                       "#   key: /etc/empath/dkim/example.com.s2026.key\n"
                       "#   algorithm: rsa-sha256\n"),
    )),
    Section("metrics", "Prometheus metrics (docs/OPERATIONS.md, \"Metrics\"), served by the "
            "admin process.", (
        Key("listen_addr", HostPort(), None,
            "host:port for /metrics (loopback unless a scraper elsewhere needs it); null: off, "
            "and instrumentation costs nothing.", nullable=True),
        Key("top_domains", Int(1, 1000), 20,
            "Destination domains with a label of their own in the per-domain delivery "
            "metrics (the busiest ones); the rest are counted as \"other\"."),
        Key("multiproc_dir", Path(), None,
            "Directory of the per-process metric files (emptied at start); null: one in "
            "/dev/shm named after spool.path (else control/metrics in the spool).",
            nullable=True),
    )),
    Section("health", "Health checks for load balancers, served by the admin process.", (
        Key("listen_addr", HostPort(), None,
            "host:port for /health/live, /health/ready and /health/detailed (may be the "
            "same as metrics.listen_addr); null: off.", nullable=True),
        Key("min_free_space", Size(), None,
            "/health/ready fails while the spool's filesystem has less free space; null: "
            "spool.min_free_space.", nullable=True),
        Key("max_queue", Int(1), None,
            "/health/ready fails while more messages than this wait for delivery (pending, "
            "active and deferred); null: no limit.", nullable=True),
        Key("master_timeout", Duration(1, 3600), 10.0,
            "/health/live fails when the master's loop has not turned for this long."),
        Key("min_delivery_success_rate", Float(0.0, 1.0), None,
            "/health/ready fails while the share of delivery attempts (per recipient) that "
            "delivered, over the last delivery_window, is below this (0.9: 90%); null: the "
            "rate is shown in /health/detailed but never fails readiness (a destination "
            "deferring everything is not a reason to stop receiving).", nullable=True),
        Key("delivery_window", Duration(10, 86400), 300.0,
            "Window of the delivery success rate."),
        Key("min_delivery_attempts", Int(1), 20,
            "Fewer attempts than this in the window: the rate is not judged."),
        Key("dns_probe_name", Str(), None,
            "Name the admin process looks up (type A) through the delivery resolver "
            "(delivery.dns) every dns_probe_interval; /health/ready fails while the resolver "
            "does not answer (any answer counts, NXDOMAIN included; a timeout or SERVFAIL "
            "does not); null: no probe.", nullable=True),
        Key("dns_probe_interval", Duration(0.1, 3600), 10.0, "Time between DNS probes."),
        Key("dns_probe_timeout", Duration(0.1, 60), 2.0, "How long a DNS probe waits."),
    )),
    Section("tracing", "OpenTelemetry tracing over OTLP/HTTP (docs/OPERATIONS.md, "
            "\"Tracing\"). The standard OTEL_* variables apply where a key here is null "
            "(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, "
            "OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER; "
            "OTEL_SDK_DISABLED=true turns tracing off).", (
        Key("enabled", Bool(), False,
            "Record and export spans; false: OpenTelemetry is not even imported, and "
            "instrumentation costs nothing measurable (needs the tracing extra: pip install "
            "empath[tracing])."),
        Key("endpoint", Str(pattern=r"^https?://"), None,
            "OTLP/HTTP traces URL, such as http://127.0.0.1:4318/v1/traces; null: "
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else "
            "http://localhost:4318/v1/traces.", nullable=True),
        Key("service_name", Str(), "empath",
            "The service.name of the spans (OTEL_SERVICE_NAME wins when set)."),
        Key("sample_ratio", Float(0.0, 1.0), 1.0,
            "Share of new traces recorded; a delivery follows its receipt's decision "
            "(ignored when OTEL_TRACES_SAMPLER is set)."),
        Key("export_interval", Duration(0.01, 60), 5.0,
            "Longest time a finished span waits before it is sent."),
        Key("export_timeout", Duration(0.1, 60), 10.0,
            "Longest time one export (an HTTP request) may take."),
    )),
    Section("audit", "Audit log: one JSON line per message event (docs/OPERATIONS.md).", (
        Key("log_path", Path(), None,
            "JSON Lines file, appended by every process; SIGUSR1 reopens it; null: off.",
            nullable=True),
        Key("redact_local_parts", Bool(), False,
            "Write addresses as ***@domain (the domain is kept for routing questions)."),
    )),
    Section("cluster", "Fleet mode (docs/DEPLOYMENT.md, \"Several nodes\"): several nodes, "
            "each with its own spool, share their per-destination connection and rate limits, "
            "circuit breakers and the duplicate window through one Redis server. Off while "
            "url is null (no Redis client is even loaded).", (
        Key("url", _redis_url(), None,
            "redis://host:port or rediss://host:port (TLS) of the Redis server; null: this "
            "node stands alone.", nullable=True),
        Key("password_file", Path(), None,
            "File holding the Redis password (its first line), or a user name and password "
            "on one line separated by a space (Redis ACL); null: no AUTH.", nullable=True),
        Key("ca_file", Path(), None,
            "CA bundle for a rediss:// server's certificate; null: the system store.",
            nullable=True),
        Key("db", Int(0, 1000), 0, "Redis database number."),
        Key("key_prefix", Str(pattern=r"^[A-Za-z0-9:._-]{0,64}$"), "empath:",
            "Prefix of every key Empath writes, so several fleets can share one server."),
        Key("node_name", Str(pattern=r"^[A-Za-z0-9._-]{1,128}$"), None,
            "This node's name in the fleet (unique per node); null: the host name.",
            nullable=True),
        Key("lease_time", Duration(2, 3600), 30.0,
            "A connection lease lives this long unless renewed (renewed every third of it "
            "while the connection is open): a node killed outright frees its connection "
            "slots within this time."),
        Key("heartbeat", Duration(0.5, 600), 5.0,
            "How often each node writes its heartbeat (name, version, queue counts, open "
            "breakers); a node unheard of for three heartbeats counts as gone."),
        Key("timeout", Duration(0.05, 60), 1.0,
            "One Redis round trip; longer (or a refused connection) counts as Redis down: "
            "each node then keeps to its share of every limit until Redis answers again."),
    )),
))
