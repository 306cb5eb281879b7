"""
Where the Kubernetes API is and how to authenticate to it.

The settings come from the C{kubernetes} package's own loaders (a kubeconfig
file with an optional context, or a pod's service account), so that every
auth method kubectl understands works here too. They are turned into a small
frozen L{ApiConfig}; the one part that changes while the daemon runs, the
bearer token, sits behind a L{TokenSource} that asks the loader again before
the token expires or after the server refused it.

The C{kubernetes} package is imported inside the functions: importing it
pulls in the whole generated client, which the manifests source and the
tests of other modules should not pay for.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import yaml
from twisted.logger import Logger

SERVICE_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_CA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

# Projected service-account tokens are rotated by the kubelet without notice,
# and a tokenFile may be rewritten by anything; the kubernetes client re-reads
# them every minute, and so do we.
FILE_TOKEN_REFRESH = 60.0
# Ask an exec plugin for a new token this long before the old one expires, so
# that a request in flight never carries an expired token.
EXPIRY_SKEW = 60.0


class ApiConfigError(Exception):
    """The API settings are missing or invalid; names the file and the field."""

    def __init__(self, origin: str, field: str, problem: str):
        self.origin = origin
        self.field = field
        self.problem = problem
        super().__init__(f"{origin}: {field}: {problem}")


@dataclass(frozen=True)
class Credential:
    """One reading of the credentials: an C{Authorization} header value."""

    authorization: Optional[str]
    # Seconds since the epoch after which the server will refuse it, if known.
    expires_at: Optional[float] = None


class _WallClock:
    @staticmethod
    def seconds() -> float:
        return time.time()


class TokenSource:
    """
    The current C{Authorization} header, re-read through C{load} when it is
    about to expire, when C{refresh_period} has passed since the last
    reading (file tokens), or after L{invalidate} (the server said 401).

    Reading is synchronous: a file read, or an exec plugin run by the
    C{kubernetes} loader. Plugins are expected to answer quickly and are only
    run when the token is due.
    """

    log = Logger()

    def __init__(
        self,
        load: Callable[[], Credential],
        *,
        origin: str,
        clock: Any = None,
        refresh_period: Optional[float] = None,
        skew: float = EXPIRY_SKEW,
        initial: Optional[Credential] = None,
    ):
        self._load = load
        self.origin = origin
        self._clock = clock if clock is not None else _WallClock()
        self._refresh_period = refresh_period
        self._skew = skew
        self._credential = initial
        self._read_at = self._clock.seconds() if initial is not None else None
        self.reads = 0 if initial is None else 1

    def authorization(self) -> Optional[str]:
        if self._due():
            self._reload()
        assert self._credential is not None
        return self._credential.authorization

    def invalidate(self) -> None:
        """The server refused the current token: read it again next time."""
        self._credential = None

    def _due(self) -> bool:
        if self._credential is None or self._read_at is None:
            return True
        now = self._clock.seconds()
        expires_at = self._credential.expires_at
        if expires_at is not None and now >= expires_at - self._skew:
            return True
        return self._refresh_period is not None and now >= self._read_at + self._refresh_period

    def _reload(self) -> None:
        previous = self._credential
        try:
            credential = self._load()
        except ApiConfigError as error:
            # A token that has not expired yet is still worth trying; the
            # server says 401 if it is not, and we come back here.
            if previous is not None:
                self.log.warn("re-reading the API token from {origin} failed: {error}",
                              origin=self.origin, error=error)
                self._read_at = self._clock.seconds()
                return
            raise
        self._credential = credential
        self._read_at = self._clock.seconds()
        self.reads += 1


@dataclass(frozen=True)
class ApiConfig:
    """How to reach one API server; everything but the token is fixed."""

    server: str
    origin: str = ""
    ca_path: Optional[str] = None
    ca_pem: Optional[bytes] = None
    client_cert_path: Optional[str] = None
    client_cert_pem: Optional[bytes] = None
    client_key_path: Optional[str] = None
    client_key_pem: Optional[bytes] = None
    verify_tls: bool = True
    tls_server_name: Optional[str] = None
    token_source: Optional[TokenSource] = field(default=None, compare=False, repr=False)

    @property
    def uses_tls(self) -> bool:
        return self.server.startswith("https://")


# -- kubeconfig


def load_kubeconfig(path: str, context: Optional[str] = None, *, clock: Any = None) -> ApiConfig:
    """
    Read C{path} (a kubeconfig) and select C{context}, or its
    current-context. Raises L{ApiConfigError} naming the file and the field.
    """
    path = os.path.abspath(os.path.expanduser(path))
    raw = _read_kubeconfig(path)
    user = _check_kubeconfig(raw, path, context)
    configuration, loader = _run_kubeconfig_loader(raw, path, context)
    origin = f"{path}" + (f" (context {context})" if context else "")

    server = configuration.host
    if not server or not re.match(r"^https?://", server):
        raise ApiConfigError(path, _cluster_field(raw, context, "server"),
                             f"expected an http:// or https:// URL, got {server!r}")
    initial = _credential_of(configuration, loader)
    token_source = None
    if initial.authorization is not None:
        from_file = bool(user) and ("tokenFile" in user and "token" not in user)
        token_source = TokenSource(
            lambda: _kubeconfig_credential(path, context),
            origin=origin,
            clock=clock,
            refresh_period=FILE_TOKEN_REFRESH if from_file else None,
            initial=initial,
        )
    ca_path = configuration.ssl_ca_cert or None
    cert_path = configuration.cert_file or None
    key_path = configuration.key_file or None
    if bool(cert_path) != bool(key_path):
        raise ApiConfigError(path, "users[].user.client-key" if cert_path else
                             "users[].user.client-certificate",
                             "a client certificate needs both a certificate and a key")
    return ApiConfig(
        server=server.rstrip("/"),
        origin=origin,
        ca_path=ca_path,
        ca_pem=_read_pem(ca_path, path, "clusters[].cluster.certificate-authority"),
        client_cert_path=cert_path,
        client_cert_pem=_read_pem(cert_path, path, "users[].user.client-certificate"),
        client_key_path=key_path,
        client_key_pem=_read_pem(key_path, path, "users[].user.client-key"),
        verify_tls=bool(configuration.verify_ssl),
        tls_server_name=getattr(configuration, "tls_server_name", None) or None,
        token_source=token_source,
    )


def _read_kubeconfig(path: str) -> Mapping[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as error:
        raise ApiConfigError(path, "file", f"cannot read it: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ApiConfigError(path, "file", f"not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ApiConfigError(path, "file", "expected a kubeconfig mapping")
    return raw


def _named(raw: Mapping[str, Any], section: str, name: str) -> Optional[Mapping[str, Any]]:
    for entry in raw.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def _check_kubeconfig(raw: Mapping[str, Any], path: str,
                      context: Optional[str]) -> Optional[Mapping[str, Any]]:
    """
    Check the fields the loader needs ourselves: its own messages name a
    config-node path but not always the field a person would look for.
    Returns the selected user's settings.
    """
    name = context or raw.get("current-context")
    if not name:
        raise ApiConfigError(path, "current-context",
                             "not set, and no context was chosen (source.context)")
    entry = _named(raw, "contexts", name)
    if entry is None or not isinstance(entry.get("context"), dict):
        raise ApiConfigError(path, f"contexts[name={name}]", "no such context")
    cluster_name = entry["context"].get("cluster")
    if not cluster_name:
        raise ApiConfigError(path, f"contexts[name={name}].context.cluster", "missing")
    cluster = _named(raw, "clusters", cluster_name)
    if cluster is None or not isinstance(cluster.get("cluster"), dict):
        raise ApiConfigError(path, f"clusters[name={cluster_name}]", "no such cluster")
    if not cluster["cluster"].get("server"):
        raise ApiConfigError(path, f"clusters[name={cluster_name}].cluster.server", "missing")
    user_name = entry["context"].get("user")
    if not user_name:
        return None
    user = _named(raw, "users", user_name)
    if user is None:
        raise ApiConfigError(path, f"users[name={user_name}]", "no such user")
    return user.get("user") or {}


def _cluster_field(raw: Mapping[str, Any], context: Optional[str], leaf: str) -> str:
    name = context or raw.get("current-context")
    entry = _named(raw, "contexts", name) or {}
    cluster = (entry.get("context") or {}).get("cluster")
    return f"clusters[name={cluster}].cluster.{leaf}"


_CONFIG_NODE_PROBLEM = re.compile(r"Expected (?:key|object with name) (\S+) in (\S+)")


def _loader_error(path: str, error: Exception) -> ApiConfigError:
    message = str(error)
    match = _CONFIG_NODE_PROBLEM.search(message)
    where = f"{match.group(2)}/{match.group(1)}" if match else "users[].user"
    if where.startswith("kube-config/"):
        where = where[len("kube-config/"):]
    return ApiConfigError(path, where, message)


def _run_kubeconfig_loader(raw: Mapping[str, Any], path: str, context: Optional[str]):
    from kubernetes.client import Configuration
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.kube_config import KubeConfigLoader

    configuration = Configuration()
    try:
        loader = KubeConfigLoader(
            config_dict=raw,
            active_context=context,
            # Relative certificate and token paths are relative to the file.
            config_base_path=os.path.dirname(path),
        )
        loader.load_and_set(configuration)
    except ConfigException as error:
        raise _loader_error(path, error) from None
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise ApiConfigError(path, "users[].user", f"{type(error).__name__}: {error}") from None
    return configuration, loader


def _credential_of(configuration: Any, loader: Any) -> Credential:
    header = configuration.api_key.get("BearerToken") or configuration.api_key.get("authorization")
    expires_at = None
    expiry = loader.__dict__.get("expiry")
    if expiry is not None:
        expires_at = expiry.timestamp()
    return Credential(_normalise_header(header), expires_at)


def _normalise_header(header: Optional[str]) -> Optional[str]:
    if not header:
        return None
    # The in-cluster loader spells the scheme "bearer"; servers accept both,
    # but a single spelling keeps logs and tests simple.
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return f"Bearer {value.strip()}"
    return header


def _kubeconfig_credential(path: str, context: Optional[str]) -> Credential:
    """Run the loader again: re-reads tokenFile, re-runs exec plugins."""
    raw = _read_kubeconfig(path)
    _check_kubeconfig(raw, path, context)
    configuration, loader = _run_kubeconfig_loader(raw, path, context)
    credential = _credential_of(configuration, loader)
    if credential.authorization is None:
        raise ApiConfigError(path, "users[].user", "no token any more")
    return credential


def _read_pem(pem_path: Optional[str], origin: str, field_name: str) -> Optional[bytes]:
    if not pem_path:
        return None
    try:
        with open(pem_path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ApiConfigError(origin, field_name, f"cannot read {pem_path}: {error.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ApiConfigError(origin, field_name, f"{pem_path} holds no PEM data")
    return data


# -- in-cluster


def load_in_cluster(
    *,
    token_path: str = SERVICE_TOKEN_PATH,
    ca_path: str = SERVICE_CA_PATH,
    environ: Optional[Mapping[str, str]] = None,
    clock: Any = None,
) -> ApiConfig:
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, token and CA files."""
    environ = os.environ if environ is None else environ
    configuration = _run_in_cluster_loader(token_path, ca_path, environ)
    initial = Credential(_normalise_header(configuration.api_key.get("BearerToken")))
    token_source = TokenSource(
        lambda: Credential(_normalise_header(
            _run_in_cluster_loader(token_path, ca_path, environ).api_key.get("BearerToken"))),
        origin=token_path,
        clock=clock,
        refresh_period=FILE_TOKEN_REFRESH,
        initial=initial,
    )
    return ApiConfig(
        server=configuration.host.rstrip("/"),
        origin="in-cluster",
        ca_path=ca_path,
        ca_pem=_read_pem(ca_path, ca_path, "ca.crt"),
        token_source=token_source,
    )


def _run_in_cluster_loader(token_path: str, ca_path: str, environ: Mapping[str, str]):
    from kubernetes.client import Configuration
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = Configuration()
    loader = InClusterConfigLoader(token_filename=token_path, cert_filename=ca_path,
                                   try_refresh_token=False, environ=environ)
    try:
        loader.load_and_set(configuration)
    except ConfigException as error:
        message = str(error)
        if "host/port" in message:
            raise ApiConfigError("environment", "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT",
                                 message) from None
        if "Token" in message or "token" in message:
            raise ApiConfigError(token_path, "token", message) from None
        raise ApiConfigError(ca_path, "ca.crt", message) from None
    except OSError as error:
        raise ApiConfigError(error.filename or token_path, "file",
                             f"cannot read it: {error.strerror}") from None
    return configuration
