"""Who may change things: the classroom deployment's admin password, sign-in throttling, session expiry,
the role of a session and the per-session queue limit. No UI here; the dashboard asks it.

Without configuration every session is an admin (a researcher on a laptop). With an admin password hash
(or Streamlit's own login and a list of admin e-mails) visitors are viewers until they sign in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PASSWORD_HASH_ENV = "SKIN_ADMIN_PASSWORD_HASH"
ADMIN_EMAILS_ENV = "SKIN_ADMIN_EMAILS"
SESSION_HOURS_ENV = "SKIN_ADMIN_SESSION_HOURS"
QUEUE_LIMIT_ENV = "SKIN_QUEUE_LIMIT"
PASSWORD_HASH_SECRET, ADMIN_EMAILS_SECRET = "admin_password_hash", "admin_emails"
SESSION_HOURS_SECRET, QUEUE_LIMIT_SECRET = "admin_session_hours", "queue_limit"

DEFAULT_SESSION_HOURS = 8.0
# Enough for "Train all five" plus an audit or an evaluation behind it; a class cannot fill the queue.
DEFAULT_QUEUE_LIMIT = 8

# scrypt at n=2**14, r=8 (16 MiB, about 50 ms): the parameters OWASP names as a minimum for scrypt.
SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES, SALT_BYTES = 2**14, 8, 1, 32, 16
HASH_SCHEME = "scrypt"

ADMIN, VIEWER = "admin", "viewer"


class PasswordHashError(ValueError):
    """A configured password hash that is not in this module's format."""


class AccessDenied(PermissionError):
    """A viewer asked for something only the admin may do."""


@dataclass(frozen=True)
class PasswordHash:
    """A parsed `scrypt$n=16384,r=8,p=1$<salt>$<key>` string (salt and key in unpadded base64)."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        return f"{HASH_SCHEME}$n={self.n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # maxmem above the 32 MiB default: 128 * n * r bytes plus OpenSSL's own working space.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=256 * n * r + 2**20)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A salted scrypt hash of the password that says its own parameters; what the admin configures."""
    if not password:
        raise ValueError("the password is empty")
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    key = _derive(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return PasswordHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, key).encode()


def parse_password_hash(encoded: str) -> PasswordHash:
    """The parts of a hash made by `hash_password`, or PasswordHashError saying what is wrong."""
    parts = encoded.strip().split("$")
    if len(parts) != 4 or parts[0] != HASH_SCHEME:
        raise PasswordHashError("expected scrypt$n=...,r=...,p=...$salt$key (make one with "
                                "`python -m core hash-password`)")
    try:
        parameters = dict(item.split("=", 1) for item in parts[1].split(","))
        n, r, p = int(parameters["n"]), int(parameters["r"]), int(parameters["p"])
        salt, key = _unb64(parts[2]), _unb64(parts[3])
    except (ValueError, KeyError) as error:
        raise PasswordHashError(f"unreadable password hash ({error})") from error
    # Bounds keep a hostile or mistyped hash from making each sign-in attempt cost gigabytes.
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and len(salt) >= 8
            and 16 <= len(key) <= 64):
        raise PasswordHashError("password hash parameters out of range")
    return PasswordHash(n, r, p, salt, key)


def verify_password(password: str, encoded: str) -> bool:
    """Whether the password matches the hash; the keys are compared in constant time."""
    stored = parse_password_hash(encoded)
    candidate = _derive(password, stored.salt, stored.n, stored.r, stored.p, len(stored.key))
    return hmac.compare_digest(candidate, stored.key)


@dataclass(frozen=True)
class AccessSettings:
    """The deployment's access configuration, from the environment and Streamlit's secrets."""

    password_hash: str | None = None
    admin_emails: frozenset[str] = frozenset()
    login_configured: bool = False  # an [auth] section in secrets: Streamlit's st.login can be used
    session_seconds: float = DEFAULT_SESSION_HOURS * 3600
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    problem: str = ""  # a configuration that could not be read: everyone is a viewer until it is fixed

    @property
    def classroom(self) -> bool:
        """Whether visitors are viewers until they sign in (otherwise everyone administers)."""
        return bool(self.password_hash) or (self.login_configured and bool(self.admin_emails)) or bool(self.problem)


def _setting(environ: Mapping[str, str], secrets_: Mapping, env_name: str, secret_name: str):
    value = environ.get(env_name)
    return value if value not in (None, "") else secrets_.get(secret_name)


def load_access_settings(environ: Mapping[str, str] | None = None, secrets_: Mapping | None = None) -> AccessSettings:
    """Settings from environment variables, which win, and Streamlit's secrets (a dict of secrets.toml).
    A malformed password hash raises PasswordHashError: a deployment that meant to lock down must not
    silently open up."""
    environ = os.environ if environ is None else environ
    secrets_ = secrets_ or {}
    password_hash = _setting(environ, secrets_, PASSWORD_HASH_ENV, PASSWORD_HASH_SECRET) or None
    if password_hash:
        parse_password_hash(password_hash)
    emails = _setting(environ, secrets_, ADMIN_EMAILS_ENV, ADMIN_EMAILS_SECRET) or []
    if isinstance(emails, str):
        emails = emails.split(",")
    hours = float(_setting(environ, secrets_, SESSION_HOURS_ENV, SESSION_HOURS_SECRET) or DEFAULT_SESSION_HOURS)
    limit = int(_setting(environ, secrets_, QUEUE_LIMIT_ENV, QUEUE_LIMIT_SECRET) or DEFAULT_QUEUE_LIMIT)
    if hours <= 0 or limit < 1:
        raise ValueError(f"admin session hours must be > 0 and the queue limit >= 1 (got {hours}, {limit})")
    return AccessSettings(password_hash=password_hash,
                          admin_emails=frozenset(email.strip().lower() for email in emails if email.strip()),
                          login_configured="auth" in secrets_, session_seconds=hours * 3600, queue_limit=limit)


def resolve_role(settings: AccessSettings, signed_in_at: float | None, now: float,
                 login_email: str | None = None) -> str:
    """ADMIN or VIEWER. Without a classroom configuration everyone is admin; otherwise a session is admin
    while its password sign-in is younger than the session length, or while it is logged in through
    Streamlit's login with one of the admin e-mails."""
    if not settings.classroom:
        return ADMIN
    if settings.password_hash and signed_in_at is not None and 0 <= now - signed_in_at < settings.session_seconds:
        return ADMIN
    if login_email and login_email.strip().lower() in settings.admin_emails:
        return ADMIN
    return VIEWER


def session_expired(settings: AccessSettings, signed_in_at: float | None, now: float) -> bool:
    """Whether a password sign-in has outlived the session length (the page then says so and forgets it)."""
    return signed_in_at is not None and now - signed_in_at >= settings.session_seconds


class LoginThrottle:
    """Failed sign-ins slow down further attempts, per session and across the whole server.

    A session gets `free_failures` attempts, then waits `base_wait` seconds, doubling with each further
    failure up to `max_wait`. Since a new browser session starts with a clean slate, the server also
    allows at most `server_failures` failures in any `server_window` seconds, from all sessions together.
    Thread-safe: every session's script thread shares one instance.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, free_failures: int = 3, base_wait: float = 2.0,
                 max_wait: float = 300.0, server_failures: int = 20, server_window: float = 60.0) -> None:
        self.clock = clock
        self.free_failures, self.base_wait, self.max_wait = free_failures, base_wait, max_wait
        self.server_failures, self.server_window = server_failures, server_window
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[int, float]] = {}  # session -> (failures, time of the last one)
        self._recent: deque[float] = deque()  # times of the server's failures within the window

    def wait_seconds(self, session: str) -> float:
        """Seconds this session must wait before its next attempt (0: it may try now)."""
        with self._lock:
            now = self.clock()
            self._forget_old(now)
            wait = 0.0
            failures, last = self._sessions.get(session, (0, now))
            if failures >= self.free_failures:
                delay = min(self.base_wait * 2 ** (failures - self.free_failures), self.max_wait)
                wait = max(wait, last + delay - now)
            if len(self._recent) >= self.server_failures:
                wait = max(wait, self._recent[0] + self.server_window - now)
            return max(wait, 0.0)

    def record_failure(self, session: str) -> None:
        with self._lock:
            now = self.clock()
            failures, _ = self._sessions.get(session, (0, now))
            self._sessions[session] = (failures + 1, now)
            self._recent.append(now)
            self._forget_old(now)

    def record_success(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def reset(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._recent.clear()

    def _forget_old(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - self.server_window:
            self._recent.popleft()


@dataclass(frozen=True)
class SignInResult:
    """The outcome of one attempt: signed in, or why not and how long to wait before the next one."""

    ok: bool
    message: str = ""
    wait_seconds: float = 0.0


def sign_in(settings: AccessSettings, throttle: LoginThrottle, session: str, password: str) -> SignInResult:
    """Check a password attempt against the configured hash, refused without checking while throttled."""
    if not settings.password_hash:
        return SignInResult(False, "No admin password is configured on this server.")
    wait = throttle.wait_seconds(session)
    if wait > 0:
        return SignInResult(False, f"Too many failed attempts: try again in {wait_text(wait)}.", wait)
    if password and verify_password(password, settings.password_hash):
        throttle.record_success(session)
        return SignInResult(True)
    throttle.record_failure(session)
    wait = throttle.wait_seconds(session)
    later = f" Too many failed attempts: try again in {wait_text(wait)}." if wait > 0 else ""
    return SignInResult(False, "Wrong password." + later, wait)


def wait_text(seconds: float) -> str:
    """"5 s", "12 min", "7 h 59 min": a wait or the time left, rounded up to the second."""
    seconds = max(int(seconds + 0.999), 1)
    if seconds < 120:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h" + (f" {minutes % 60} min" if minutes % 60 else "")


_throttle = LoginThrottle()


def shared_login_throttle() -> LoginThrottle:
    """The server's one throttle (module state, like the job queue: a cleared UI cache cannot reset it)."""
    return _throttle
