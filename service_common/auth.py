"""Who may call the services and what a spec may make them load (docs/security.md).

Three guards, all configured from the environment so the compose file, ``make stack`` and the
tests set them the same way:

* bearer tokens on every gRPC method but health and reflection (server interceptors for the sync
  evaluator and the grpc.aio monitor; the token as call metadata on every client channel);
* TLS on the gRPC ports when a certificate is given;
* the model policy: ``trust_remote_code`` and local model folders outside an operator allowlist are
  refused before any process touches the folder, whatever the spec says.

A server with no token configured serves only on a loopback address (or a unix socket): a process
that another host can reach never runs unauthenticated unless an operator writes ``SLMCL_AUTH=off``.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from slmcl.config.spec import ModelSpec
from slmcl.errors import PermissionDeniedError

log = logging.getLogger(__name__)

# --- settings (every name documented in docs/security.md) ------------------------------------------------
TOKENS_ENV = "SLMCL_TOKENS"  # servers: accepted tokens, separated by commas or whitespace
TOKEN_ENV = "SLMCL_TOKEN"  # clients: the token to send (servers accept it too)
TOKENS_FILE_ENV = "SLMCL_TOKENS_FILE"  # servers: a file of accepted tokens, one a line, '#' comments
TOKEN_FILE_ENV = "SLMCL_TOKEN_FILE"  # clients: a file holding the token (default ~/.config/slmcl/token)
AUTH_ENV = "SLMCL_AUTH"  # "off": serve without tokens on a non-loopback address (a trusted network only)
TLS_CERT_ENV = "SLMCL_TLS_CERT"  # servers: PEM certificate chain
TLS_KEY_ENV = "SLMCL_TLS_KEY"  # servers: PEM private key
TLS_CA_ENV = "SLMCL_TLS_CA"  # clients: PEM of the CA (or the self-signed certificate) to trust
TLS_SERVER_NAME_ENV = "SLMCL_TLS_SERVER_NAME"  # clients: the name to verify when it differs from the address
ALLOW_REMOTE_CODE_ENV = "SLMCL_ALLOW_REMOTE_CODE"  # "1": specs may set model.trust_remote_code
MODEL_ALLOWLIST_ENV = "SLMCL_MODEL_ALLOWLIST"  # directories and hub-id patterns a spec's model may name

DEFAULT_TOKEN_FILE = "~/.config/slmcl/token"
MIN_TOKEN_CHARS = 16
EMBEDDED_PREFIX = "embedded:"
# Methods anyone may call: load balancers and container health checks carry no token.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                          "/grpc.reflection.v1.ServerReflection/")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = ("1", "true", "yes", "on")


class AuthConfigError(SystemExit):
    """A setting that makes the service unsafe or unusable: the process stops at start-up with this line."""

    def __init__(self, message: str) -> None:
        super().__init__(f"slmcl: {message}")


# --- tokens ------------------------------------------------------------------------------------------------

def _split_tokens(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out += [t for t in re.split(r"[\s,]+", line) if t]
    return out


def _read_token_file(path: str, setting: str) -> list[str]:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise AuthConfigError(f"{setting}={path}: cannot read ({exc.strerror or exc})") from None
    return _split_tokens(text)


def server_tokens(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every token a server accepts: SLMCL_TOKENS, SLMCL_TOKEN and the lines of SLMCL_TOKENS_FILE."""
    env = os.environ if env is None else env
    tokens = _split_tokens(env.get(TOKENS_ENV, "")) + _split_tokens(env.get(TOKEN_ENV, ""))
    if env.get(TOKENS_FILE_ENV):
        tokens += _read_token_file(env[TOKENS_FILE_ENV], TOKENS_FILE_ENV)
    short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS]
    if short:  # a guessable token is worse than none: it looks like protection
        raise AuthConfigError(f"{TOKENS_ENV}/{TOKEN_ENV}/{TOKENS_FILE_ENV}: {len(short)} token(s) shorter than "
                              f"{MIN_TOKEN_CHARS} characters; generate one with "
                              "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return tuple(dict.fromkeys(tokens))


def client_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token a client sends: SLMCL_TOKEN, else the file SLMCL_TOKEN_FILE or ~/.config/slmcl/token, else
    the first token this process accepts as a server (the monitor calling the evaluators with the shared one)."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return _split_tokens(env[TOKEN_ENV])[0]
    if env.get(TOKEN_FILE_ENV):
        tokens = _read_token_file(env[TOKEN_FILE_ENV], TOKEN_FILE_ENV)
        if not tokens:
            raise AuthConfigError(f"{TOKEN_FILE_ENV}={env[TOKEN_FILE_ENV]}: the file holds no token")
        return tokens[0]
    default = Path(DEFAULT_TOKEN_FILE).expanduser()
    if default.is_file():
        tokens = _read_token_file(str(default), DEFAULT_TOKEN_FILE)
        if tokens:
            return tokens[0]
    accepted = _split_tokens(env.get(TOKENS_ENV, ""))
    if not accepted and env.get(TOKENS_FILE_ENV):
        accepted = _read_token_file(env[TOKENS_FILE_ENV], TOKENS_FILE_ENV)
    return accepted[0] if accepted else None


def auth_disabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(AUTH_ENV, "").strip().lower() in ("off", "0", "false", "no")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenChecker:
    """Constant-time membership: every accepted token is compared, equal-length digests, no early exit."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(t) for t in tokens)
        if not self._digests:
            raise ValueError("TokenChecker needs at least one token")

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when the call carries a valid token, else why not (for the UNAUTHENTICATED status)."""
        header = None
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                break
        if header is None:
            return (f"no bearer token: set {TOKEN_ENV} or {TOKEN_FILE_ENV} (or write it to {DEFAULT_TOKEN_FILE}); "
                    "`make stack` prints where its token is")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the authorization metadata must be 'Bearer <token>'"
        given = _digest(token.strip())
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(given, d)
        return None if ok else "invalid token"


def _public(method: str) -> bool:
    return method.startswith(PUBLIC_METHOD_PREFIXES)


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED without running it."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


def _aio_denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


def _peer_note(method: str, why: str) -> None:
    log.warning("refused %s: %s", method, why)


class TokenInterceptor(grpc.ServerInterceptor):
    """Every method but health and reflection needs ``authorization: Bearer <token>`` (sync servers)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.checker = TokenChecker(tokens)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _public(method):
            return handler
        why = self.checker.check(handler_call_details.invocation_metadata)
        if why is None:
            return handler
        _peer_note(method, why)
        return _denying(handler, why)


class AioTokenInterceptor(grpc.aio.ServerInterceptor):
    """The same for grpc.aio servers (the monitor)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.checker = TokenChecker(tokens)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _public(method):
            return handler
        why = self.checker.check(handler_call_details.invocation_metadata)
        if why is None:
            return handler
        _peer_note(method, why)
        return _aio_denying(handler, why)


def _server_tokens_or_none() -> tuple[str, ...]:
    if auth_disabled():
        log.warning("%s=off: every gRPC method is open to whoever reaches the port", AUTH_ENV)
        return ()
    tokens = server_tokens()
    if not tokens:
        log.warning("no token configured (%s, %s, %s): serving without authentication, on loopback only",
                    TOKENS_ENV, TOKEN_ENV, TOKENS_FILE_ENV)
    return tokens


def server_interceptors() -> list[grpc.ServerInterceptor]:
    """For ``grpc.server(..., interceptors=...)``: the token check when tokens are configured."""
    tokens = _server_tokens_or_none()
    return [TokenInterceptor(tokens)] if tokens else []


def aio_server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """For ``grpc.aio.server(interceptors=...)``."""
    tokens = _server_tokens_or_none()
    return [AioTokenInterceptor(tokens)] if tokens else []


# --- binding and TLS ----------------------------------------------------------------------------------------

def is_local_address(address: str) -> bool:
    """A loopback host (127.0.0.0/8, ::1, localhost) or a unix socket: no other host can connect."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_pem(path: str, setting: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"{setting}={path}: cannot read ({exc.strerror or exc})") from None


def server_credentials(env: Mapping[str, str] | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials from SLMCL_TLS_CERT and SLMCL_TLS_KEY; None when neither is set."""
    env = os.environ if env is None else env
    cert, key = env.get(TLS_CERT_ENV, ""), env.get(TLS_KEY_ENV, "")
    if not cert and not key:
        return None
    if not (cert and key):
        raise AuthConfigError(f"{TLS_CERT_ENV} and {TLS_KEY_ENV} must be set together (PEM files)")
    return grpc.ssl_server_credentials([(_read_pem(key, TLS_KEY_ENV), _read_pem(cert, TLS_CERT_ENV))])


def add_port(server: grpc.Server | grpc.aio.Server, address: str) -> int:
    """Bind ``address``: TLS when a certificate is configured, and never unauthenticated off loopback.

    Works for ``grpc.Server`` and ``grpc.aio.Server`` (both bind synchronously). Returns the port.
    """
    if not is_local_address(address) and not auth_disabled() and not server_tokens():
        raise AuthConfigError(
            f"refusing to serve {address} without authentication: set {TOKENS_ENV} (or {TOKENS_FILE_ENV}) to the "
            f"tokens clients must present, bind a loopback address, or set {AUTH_ENV}=off on a trusted network")
    creds = server_credentials()
    try:
        port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises when the address cannot be bound
        raise AuthConfigError(f"cannot bind {address}: {exc}") from None
    if port == 0:
        raise AuthConfigError(f"cannot bind {address}")
    log.info("listening on %s (%s)", address, "TLS" if creds is not None else "plaintext")
    return port


# --- client channels ----------------------------------------------------------------------------------------

class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


def _with_token(details: Any, token: str) -> _CallDetails:
    metadata = [m for m in (details.metadata or ()) if m[0].lower() != "authorization"]
    metadata.append(("authorization", f"Bearer {token}"))
    return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The token as metadata on a plaintext channel (gRPC call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(_with_token(client_call_details, self.token), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(_with_token(client_call_details, self.token), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(_with_token(client_call_details, self.token), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(_with_token(client_call_details, self.token), request_iterator)


def channel_credentials(env: Mapping[str, str] | None = None) -> grpc.ChannelCredentials | None:
    """TLS trusting SLMCL_TLS_CA; None (plaintext) when it is not set."""
    env = os.environ if env is None else env
    ca = env.get(TLS_CA_ENV, "")
    return grpc.ssl_channel_credentials(root_certificates=_read_pem(ca, TLS_CA_ENV)) if ca else None


DEFAULT_OPTIONS: Sequence[tuple[str, Any]] = ()


def client_channel(address: str, options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS, *,
                   token: str | None = None, env: Mapping[str, str] | None = None) -> grpc.Channel:
    """A channel that authenticates: the token on every call, TLS when SLMCL_TLS_CA is set.

    ``token`` and ``env`` override the environment (tests, tools that hold their own token).
    """
    env = os.environ if env is None else env
    token = token if token is not None else client_token(env)
    opts = list(options)
    if env.get(TLS_SERVER_NAME_ENV):
        opts.append(("grpc.ssl_target_name_override", env[TLS_SERVER_NAME_ENV]))
    tls = channel_credentials(env)
    if tls is not None:
        creds = tls if token is None else grpc.composite_channel_credentials(
            tls, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, creds, options=opts)
    ch = grpc.insecure_channel(address, options=opts)
    return ch if token is None else grpc.intercept_channel(ch, _TokenMetadata(token))


class _AioToken:
    """The token as metadata on a plaintext grpc.aio channel: one interceptor object per call shape, because
    grpc.aio files each interceptor under the first shape it implements."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, d: Any) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*[(k, v) for k, v in (d.metadata or ()) if k.lower() != "authorization"])
        md.add("authorization", f"Bearer {self.token}")
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def aio_client_channel(address: str, options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS, *,
                       token: str | None = None, env: Mapping[str, str] | None = None) -> grpc.aio.Channel:
    """``client_channel`` for asyncio code (a grpc.aio monitor calling its evaluators)."""
    env = os.environ if env is None else env
    token = token if token is not None else client_token(env)
    opts = list(options)
    if env.get(TLS_SERVER_NAME_ENV):
        opts.append(("grpc.ssl_target_name_override", env[TLS_SERVER_NAME_ENV]))
    tls = channel_credentials(env)
    if tls is not None:
        creds = tls if token is None else grpc.composite_channel_credentials(
            tls, grpc.access_token_call_credentials(token))
        return grpc.aio.secure_channel(address, creds, options=opts)
    interceptors: list[Any] | None = None
    if token is not None:
        interceptors = [cls(token) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)


# --- what a spec may load -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelPolicy:
    """Which models a service loads for a spec, set by the operator, never by the spec.

    * ``embedded:...`` names: always (the packaged model, converted by slmcl itself);
    * a local folder: only under one of ``directories`` (symlinks resolved on both sides);
    * a hub id (``org/name``): when it matches one of ``hub_patterns`` (fnmatch); with
      SLMCL_MODEL_ALLOWLIST unset that is every hub id, else exactly the patterns it lists;
    * ``trust_remote_code``: only with SLMCL_ALLOW_REMOTE_CODE=1.
    """

    allow_remote_code: bool = False
    directories: tuple[str, ...] = ()
    hub_patterns: tuple[str, ...] = ("*",)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ModelPolicy:
        env = os.environ if env is None else env
        remote = env.get(ALLOW_REMOTE_CODE_ENV, "").strip().lower() in _TRUE
        raw = env.get(MODEL_ALLOWLIST_ENV)
        if raw is None or not raw.strip():
            return cls(allow_remote_code=remote)
        dirs, hubs = [], []
        for entry in (e.strip() for e in re.split(r"[,\n]", raw)):
            if not entry:
                continue
            if entry.startswith(("/", "~")):
                dirs.append(os.path.realpath(os.path.expanduser(entry)))
            elif entry.startswith("."):
                raise AuthConfigError(f"{MODEL_ALLOWLIST_ENV}: {entry!r}: directories must be absolute paths")
            else:
                hubs.append(entry)
        return cls(allow_remote_code=remote, directories=tuple(dirs), hub_patterns=tuple(hubs))

    def describe(self) -> str:
        parts = [*self.directories, *self.hub_patterns]
        return ", ".join(parts) if parts else "(empty)"

    def check(self, model: ModelSpec, field: str = "model") -> None:
        """Raise PermissionDeniedError naming the spec field and the operator setting that would allow it."""
        if model.trust_remote_code and not self.allow_remote_code:
            raise PermissionDeniedError(
                f"{field}.trust_remote_code: refused by this server (code shipped with a model would run inside "
                f"the services); an operator can allow it with {ALLOW_REMOTE_CODE_ENV}=1 on every service")
        name = model.name
        if name.startswith(EMBEDDED_PREFIX):
            return
        if is_hub_id(name):
            if any(fnmatch.fnmatchcase(name, p) for p in self.hub_patterns):
                return
            raise PermissionDeniedError(
                f"{field}.name {name!r}: this hub model is not allowed here; an operator can add it (or a pattern "
                f"such as 'org/*') to {MODEL_ALLOWLIST_ENV} (now: {self.describe()})")
        real = os.path.realpath(os.path.expanduser(name))
        if any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.directories):
            return
        raise PermissionDeniedError(
            f"{field}.name {name!r}: local model folders must lie under a directory of {MODEL_ALLOWLIST_ENV} "
            f"(now: {self.describe() if self.directories else 'no directory'}); an operator can add one, "
            f"e.g. {MODEL_ALLOWLIST_ENV}=/srv/models")


def is_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` that is no path on this host (transformers prefers a local folder of that name)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not os.path.exists(name)


def check_model(model: ModelSpec, field: str = "model") -> None:
    """The policy of this process's environment applied to a spec's model (read on every call: cheap)."""
    ModelPolicy.from_env().check(model, field)
