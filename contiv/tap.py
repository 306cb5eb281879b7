"""
C{twistd contiv}: the command-line options and the service tree.

Options come from the key table in L{contiv.config}; C{makeService} only
wires parts together, each part built by a small helper below.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from contiv import config as configuration
from contiv.service import OrderedService


def _help(key: configuration.Key) -> str:
    default = f", default {key.default}" if isinstance(key.default, str) else ""
    return f"{key.help} [config key {key.name}{default}]"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Enforce Kubernetes NetworkPolicy in an Open vSwitch bridge and serve node-local "
        "DNS. Every option is also a key of the YAML file given with --config; the "
        "command line wins over the file."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file", None],
    ] + [
        [key.option, None, None, _help(key)]
        for key in configuration.KEYS if not key.flag and not key.repeatable
    ]
    optFlags = [[key.option, None, _help(key)] for key in configuration.KEYS if key.flag]

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {}
        self.config: Optional[configuration.Config] = None
        self.api_config: Any = None

    def opt_dns_upstream(self, value: str) -> None:
        """upstream resolver host[:port]; repeat for several (default: the nameservers in
        /etc/resolv.conf) [config key dns.upstreams, a list]"""
        self.repeated.setdefault("dns.upstreams", []).append(value)

    def command_line_values(self) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.repeated)
        for key in configuration.KEYS:
            if key.repeatable:
                continue
            given = self.get(key.option)
            if key.flag:
                if given:
                    values[key.name] = True
            elif given is not None:
                values[key.name] = given
        return values

    def load(self) -> configuration.Config:
        """Build the configuration, raising ConfigError on the first bad key."""
        path = self["config"]
        file_values = configuration.read_file(path) if path else {}
        return configuration.build(file_values, self.command_line_values(), path or "")

    def postOptions(self) -> None:
        try:
            self.config = self.load()
            self.api_config = load_api_config(self.config)
        except configuration.ConfigError as e:
            # twistd would print the whole --help before a UsageError: for a
            # bad value in a config file that buries the one line that matters.
            sys.stderr.write(f"contiv: configuration error: {e}\n")
            raise SystemExit(1)
        if self.config["log.format"] == "json" and self.parent is not None:
            # twistd builds its log observer from its own --logger option
            # after our options are parsed: point it at the JSON formatter.
            self.parent["logger"] = "contiv.logs.json_observer"


def load_api_config(config: configuration.Config) -> Any:
    """
    The API server's address and credentials, read at start so that a bad
    kubeconfig is a configuration error naming the file and field, not a
    failure of a running daemon.
    """
    if not (config["source.kubeconfig"] or config["source.in_cluster"]):
        return None
    from contiv.k8s.apiconfig import ApiConfigError, load_in_cluster, load_kubeconfig

    try:
        if config["source.kubeconfig"]:
            return load_kubeconfig(config["source.kubeconfig"], config["source.context"])
        return load_in_cluster()
    except ApiConfigError as e:
        key = "source.kubeconfig" if config["source.kubeconfig"] else "source.in_cluster"
        raise configuration.ConfigError(key, str(e)) from None


def makeService(options: Options) -> "ContivService":
    from twisted.internet import reactor

    try:
        return build_service(options.config, reactor, options.api_config)
    except configuration.ConfigError as e:
        # Some keys can only be checked against the machine (the resolvers
        # in /etc/resolv.conf): same one-line error as a bad option.
        sys.stderr.write(f"contiv: configuration error: {e}\n")
        raise SystemExit(1)


class ContivService(OrderedService):
    """
    The root of the service tree. twistd ignores what C{startService}
    returns, so a failed start is handled here: logged, and the process ends
    with status 1 once the reactor has shut down.
    """

    log = Logger()

    def __init__(self, reactor: Any, config: configuration.Config):
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.roles: dict[str, Any] = {}
        self.start_failure = None

    def statuses(self) -> dict[str, Any]:
        return {name: role.status() for name, role in self.roles.items()}

    def startService(self):
        d = super().startService()

        def started(_: Any) -> None:
            self.log.info("contiv started: roles {roles}", roles=", ".join(self.roles))

        def failed(failure: Any) -> None:
            self.start_failure = failure
            self.log.critical("contiv failed to start: {error}",
                              error=failure.getErrorMessage())
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
            # twistd starts the services before it runs the reactor.
            self.reactor.callWhenRunning(self.reactor.stop)

        return d.addCallbacks(started, failed)


class StoreService(Service):
    """Closes the store (its connections and threads) when the daemon stops."""

    name = "store"

    def __init__(self, store: Any):
        self.store = store

    def stopService(self) -> Any:
        super().stopService()
        return self.store.close()


def _exit_failed() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    # twistd has no way to report an exit status; by now every service has
    # stopped and the reactor is down, so nothing is lost by leaving here.
    os._exit(1)


def build_service(config: configuration.Config, reactor: Any,
                  api_config: Any = None) -> ContivService:
    root = ContivService(reactor, config)
    store = build_store(config, reactor)
    # First child, so it is stopped last: the roles may still write while stopping.
    StoreService(store).setServiceParent(root)
    if "netmaster" in config.roles:
        root.roles["netmaster"] = build_netmaster(config, reactor, store, api_config)
    dns = None
    if "netplugin" in config.roles:
        dns = build_dns(config, reactor)
        root.roles["netplugin"] = build_netplugin(config, reactor, store, dns)
    # Roles first: the listeners report on them and the manhole exposes them.
    for role in root.roles.values():
        role.setServiceParent(root)
    if dns is not None and dns.server is not None:
        dns.server.setServiceParent(root)
    if config["http.listen"]:
        build_http(config, reactor, root).setServiceParent(root)
    if config["manhole.listen"]:
        build_manhole(config, reactor, root, store).setServiceParent(root)
    return root


def build_store(config: configuration.Config, reactor: Any) -> Any:
    from contiv.store import open_store

    return open_store(reactor, config["store"])


def build_source(config: configuration.Config, reactor: Any, stream: Any,
                 api_config: Any) -> Any:
    if config["source.manifests"]:
        from contiv.k8s.manifests import ManifestsSource

        return ManifestsSource(reactor, config["source.manifests"], stream)
    from contiv.k8s.reflector import ApiSource

    return ApiSource(reactor, api_config, stream)


def build_netmaster(config: configuration.Config, reactor: Any, store: Any,
                    api_config: Any) -> Any:
    from contiv.k8s.events import EventStream
    from contiv.roles.netmaster import NetmasterService

    stream = EventStream()
    elector = None
    if config["election.enabled"] and api_config is not None:
        from contiv.k8s.client import ApiClient
        from contiv.k8s.lease import LeaderElector, LeaseApi

        # A client of its own: a renewal must not queue behind the watches'
        # connections, and it must not wait longer than the renew deadline.
        deadline = config["election.renew_deadline"]
        client = ApiClient(reactor, api_config, request_timeout=deadline,
                           connect_timeout=deadline)
        api = LeaseApi(client, config["election.namespace"], config["election.lease"],
                       timeout=deadline)
        elector = LeaderElector(api, config["election.identity"], clock=reactor,
                                lease_duration=config["election.lease_duration"],
                                renew_deadline=deadline,
                                retry_period=config["election.retry_period"])
    return NetmasterService(build_source(config, reactor, stream, api_config), stream, store,
                            clock=reactor, prefix=config["store_prefix"], elector=elector)


class DnsParts:
    """
    What answers DNS on a node: one L{Answerer} over the newest name table,
    shared by the server (on dns.listen, if set) and the datapath intercept
    (if dns.datapath), so both give the same answers and share one hot cache.
    """

    def __init__(self, answerer: Any, server: Any, datapath: bool):
        from contiv.dns.answer import HIT, NODATA

        self.answerer = answerer
        self.server = server
        self.datapath = datapath
        # What the datapath answers itself: names the table knows.
        self._ours = (HIT, NODATA)

    def set_table(self, table: Any) -> None:
        self.answerer.set_table(table)

    def namespace_of(self, address: str) -> Optional[str]:
        return self.answerer.table.namespace_of(address)

    def answer_datapath(self, query: bytes, client_ip: str) -> Optional[bytes]:
        """
        The reply to a pod's query caught in the datapath, or None: let it go
        on to the resolver the pod asked. Only names the table knows are
        answered here; NXDOMAIN for the cluster domain, errors and anything
        to forward are that resolver's to give.
        """
        # The reply goes back as one frame on a 1500-byte link: at most 1452
        # bytes of DNS under an IPv6 and a UDP header (less if the client
        # says so); a longer answer is truncated, and so not ours to give.
        outcome, data = self.answerer.respond(query, self.namespace_of(client_ip), 1452)
        return data if outcome in self._ours else None


def build_dns(config: configuration.Config, reactor: Any) -> Optional[DnsParts]:
    if not (config["dns.listen"] or config["dns.datapath"]):
        return None
    from contiv.dns.answer import Answerer
    from contiv.dns.names import NameTable

    answerer = Answerer(NameTable(config["dns.domain"]), ttl=config["dns.ttl"])
    parts = DnsParts(answerer, None, bool(config["dns.datapath"]))
    if config["dns.listen"]:
        from contiv.dns.forward import Forwarder, RESOLV_CONF, system_upstreams
        from contiv.dns.server import DnsServerService

        upstreams = config["dns.upstreams"] or system_upstreams(
            RESOLV_CONF, exclude=[config["dns.listen"]])
        if not upstreams:
            raise configuration.ConfigError(
                "dns.upstreams", f"not set, and {RESOLV_CONF} names no nameserver other "
                "than dns.listen: give the resolvers to forward to")
        forwarder = Forwarder(upstreams, reactor=reactor,
                              cache_size=config["dns.forward_cache"])
        parts.server = DnsServerService(config["dns.listen"], answerer, forwarder,
                                        parts.namespace_of, reactor=reactor)
    return parts


def build_netplugin(config: configuration.Config, reactor: Any, store: Any,
                    dns: Optional[DnsParts] = None) -> Any:
    from contiv.roles.netplugin import NetpluginService

    datapath = client = None
    if config["openflow.connect"]:
        from contiv.datapath.manager import DatapathManager
        from contiv.datapath.ovsdb import BridgeSettings
        from contiv.openflow.client import OpenFlowClient

        settings = BridgeSettings(reactor, bridge_name(config), config["openflow.ovsdb"])
        intercept = dns is not None and dns.datapath
        rate, burst = config["dns.datapath_rate"], config["dns.datapath_burst"]
        datapath = DatapathManager(reactor, settings, dns_intercept=intercept,
                                   dns_rate=rate, dns_burst=burst)
        on_packet_in = None
        if intercept:
            from contiv.dns.datapath import DnsInterceptor

            on_packet_in = DnsInterceptor(dns.answer_datapath, datapath,  # type: ignore
                                          clock=reactor, rate=rate, burst=burst).packet_in
        client = OpenFlowClient(reactor, config["openflow.connect"],
                                on_connect=datapath.connected, on_packet_in=on_packet_in)
    return NetpluginService(config["node"], store, clock=reactor,
                            prefix=config["store_prefix"], datapath=datapath,
                            openflow_client=client, dns_domain=config["dns.domain"],
                            on_names=dns.set_table if dns is not None else None)


def bridge_name(config: configuration.Config) -> Optional[str]:
    """
    openflow.bridge, or the name in the management socket's path (br0.mgmt ->
    br0); None for another endpoint (tcp:...): found from the datapath id.
    """
    if config["openflow.bridge"]:
        return config["openflow.bridge"]
    try:
        return configuration.bridge_from_endpoint(config["openflow.connect"])
    except ValueError:
        return None


def build_http(config: configuration.Config, reactor: Any, root: ContivService) -> Any:
    from contiv import metrics
    from contiv.http import make_site
    from contiv.service import ListeningService

    description = config["http.listen"]
    site = make_site(root.statuses,
                     [metrics.REGISTRY, metrics.instance_registry(root.statuses)])
    service = ListeningService(endpoints.serverFromString(reactor, description), site,
                               description)
    service.setName("http")
    return service


def build_manhole(config: configuration.Config, reactor: Any, root: ContivService,
                  store: Any) -> Any:
    from contiv.manhole import makeManholeService

    namespace = {
        "contiv": root,
        "roles": root.roles,
        "config": config,
        "store": store,
        "reactor": reactor,
    }
    service = makeManholeService(reactor, config["manhole.listen"],
                                 config["manhole.authorized_keys"], namespace,
                                 host_key_path=config["manhole.host_key"])
    service.setName("manhole")
    return service
