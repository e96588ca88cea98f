"""The receivers' TLS certificates: the configured pair of each listener, or the self-signed
one Empath generates on first start.

TLS is on by default. A listener with ``tls.enabled`` true (the default) and no ``tls.cert``
uses ``<tls_dir>/selfsigned.crt`` and ``selfsigned.key``, which the master creates before it
forks the receivers when they do not exist yet (an ECDSA P-256 key, mode 0600, which every
current TLS stack accepts and which takes well under a millisecond to make where RSA 2048 takes
about 100 ms, and a certificate for ``hostname`` valid ten years, as Debian's snakeoil
certificate); the log says so and how to replace it. ``tls: off`` on a listener turns TLS off there.
The pair is made again (with a warning saying why) when it is not two regular files of the
daemon's user (a link another user planted), when others may read the key, or when the
certificate is for another name than ``hostname``; it is never made in a directory other users
may write in (an error, and those listeners offer no TLS).

A receiver that cannot load a listener's certificate at run time (a file replaced by a broken
one since the master checked it) does not exit: :func:`server_context` reports the problem, and
the receiver serves that listener without STARTTLS (smtps: every TLS handshake fails).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import ssl
import stat

from empath.config.typed import Config, ListenerConfig

CERT_NAME = "selfsigned.crt"
KEY_NAME = "selfsigned.key"
VALID_DAYS = 3650


def self_signed_paths(cfg: Config) -> tuple[str, str]:
    """(certificate, key) of the generated self-signed pair."""
    return (os.path.join(cfg.tls_dir, CERT_NAME), os.path.join(cfg.tls_dir, KEY_NAME))


def listener_pair(cfg: Config, listener: ListenerConfig) -> tuple[str, str] | None:
    """The (certificate, key) a listener serves, or None when its TLS is off."""
    if not listener.tls.enabled:
        return None
    if listener.tls.cert is not None and listener.tls.key is not None:  # both or neither
        return (listener.tls.cert, listener.tls.key)
    return self_signed_paths(cfg)


def needs_self_signed(cfg: Config) -> bool:
    """Whether some listener has TLS on without a certificate of its own."""
    return any(lst.tls.enabled and lst.tls.cert is None for lst in cfg.listeners)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side context presenting ``cert``; ssl.SSLError or OSError when it cannot."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def ensure_self_signed(cfg: Config, log: logging.Logger, owner: tuple[int, int] | None = None
                       ) -> bool:
    """Create the self-signed pair if a listener needs it and it does not exist yet; True
    when it was created. ``owner`` (uid, gid) is given the files when the daemon will run as
    another user. OSError when tls_dir cannot be written."""
    if not needs_self_signed(cfg):
        return False
    cert_path, key_path = self_signed_paths(cfg)
    os.makedirs(cfg.tls_dir, mode=0o700, exist_ok=True)
    owners = {0, os.geteuid()} | ({owner[0]} if owner is not None else set())
    _check_directory(cfg.tls_dir, owners)
    problem = _unusable(cert_path, key_path, cfg.hostname, owners)
    if problem is None:
        return False
    if problem != "missing":
        log.warning("TLS: the generated certificate %s or its key %s %s: making a new pair",
                    cert_path, key_path, problem)
    cert_pem, key_pem = generate_self_signed(cfg.hostname)
    _write(key_path, key_pem, 0o600, owner)
    _write(cert_path, cert_pem, 0o644, owner)
    if owner is not None:
        os.chown(cfg.tls_dir, *owner)
    log.warning("TLS: no certificate configured, so a self-signed certificate for %s was "
                "generated: %s (key %s, mode 0600). Clients that verify certificates will "
                "not trust it; to replace it, set tls.cert and tls.key of the listener(s) to "
                "your certificate chain and key (e.g. from Let's Encrypt) and reload, or turn "
                "TLS off with tls: off", cfg.hostname, cert_path, key_path)
    return True


def _write(path: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a stale one, or a planted link: never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _check_directory(path: str, owners: set[int]) -> None:
    """OSError unless ``path`` belongs to one of ``owners`` and no other user may write in
    it: another user could plant the key there (or a link to a key of theirs)."""
    st = os.stat(path)
    if st.st_uid not in owners or st.st_mode & 0o022:
        raise OSError(errno.EPERM, f"{path} is owned by uid {st.st_uid} with mode "
                      f"{stat.S_IMODE(st.st_mode):04o}; it must belong to the daemon's user "
                      "(or root) and be writable by it alone")


def _unusable(cert_path: str, key_path: str, hostname: str, owners: set[int]) -> str | None:
    """Why the generated pair must be made again, or None when it is fine: missing, not
    regular files of the daemon's user (a link planted by another user), a key others may
    read (compromised), a certificate for another hostname (``hostname`` was changed)."""
    try:
        cert_st, key_st = os.lstat(cert_path), os.lstat(key_path)
    except FileNotFoundError:
        return "missing"
    for st in (cert_st, key_st):
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners:
            return "are not regular files of the daemon's user"
    if key_st.st_mode & 0o077:
        return f"(mode {stat.S_IMODE(key_st.st_mode):04o}) may be read by other users"
    from cryptography import x509

    try:
        with open(cert_path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound):
        return "do not parse"
    if names != [hostname]:
        return f"are for {', '.join(names) or 'no name'}, not for the hostname {hostname}"
    return None


def generate_self_signed(hostname: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a new self-signed certificate for ``hostname``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
