"""WIT glue for the F5 BIG-IP plugin: turns the host's imports into the
plain host object `f5sync` expects, and its outcomes into WIT variants.

Built with componentize-py; every call runs in a fresh instance, and `init`
runs first in each, so the configuration lives in a module global.
"""

import traceback

import f5sync
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import http, inventory, kv, log, types

_LEVELS = {
    "trace": log.Level.TRACE,
    "debug": log.Level.DEBUG,
    "info": log.Level.INFO,
    "warn": log.Level.WARN,
    "error": log.Level.ERROR,
}

_HTTP_ERRORS = {
    http.Error_Denied: "denied",
    http.Error_InvalidRequest: "invalid-request",
    http.Error_Timeout: "timeout",
    http.Error_ConnectionFailed: "connection-failed",
    http.Error_TooLarge: "too-large",
    http.Error_LimitExceeded: "limit-exceeded",
    http.Error_Other: "other",
}

_config = None


class _Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body


class _Host:
    """The host's imports, with WIT errors turned into f5sync's exceptions."""

    def send(self, method, url, headers, body, timeout_ms):
        try:
            r = http.send(http.Request(method, url, list(headers), body, timeout_ms))
        except Err as e:
            kind = _HTTP_ERRORS.get(type(e.value), "other")
            raise f5sync.HttpFailure(kind, str(getattr(e.value, "value", "") or "")) from None
        return _Response(r.status, r.headers, r.body)

    def kv_get(self, key):
        try:
            return kv.get(key)
        except Err as e:
            raise f5sync.KvFailure(str(e.value)) from None

    def kv_set(self, key, value):
        try:
            kv.set(key, value)
        except Err as e:
            raise f5sync.KvFailure(str(e.value)) from None

    def kv_delete(self, key):
        try:
            kv.delete(key)
        except Err as e:
            raise f5sync.KvFailure(str(e.value)) from None

    def kv_list(self, prefix):
        try:
            return kv.list_keys(prefix)
        except Err as e:
            raise f5sync.KvFailure(str(e.value)) from None

    def kv_commit(self):
        try:
            kv.commit()
        except Err as e:
            raise f5sync.KvFailure(str(e.value)) from None

    def log(self, level, message):
        log.log(_LEVELS.get(level, log.Level.INFO), message)


def _outcome(outcome):
    if outcome[0] == "done":
        return types.Outcome_Done()
    if outcome[0] == "retry":
        return types.Outcome_Retry(types.Retry(outcome[1], outcome[2]))
    return types.Outcome_Reject(outcome[1])


def _config_or_trap():
    if _config is None:
        raise RuntimeError("f5-bigip: init must run before handle or reconcile")
    return _config


class Handler(exports.Handler):
    def init(self, config: str) -> types.PluginInfo:
        global _config
        try:
            _config = f5sync.Config.parse(config)
        except f5sync.ConfigError as e:
            raise Err(f"invalid f5-bigip configuration: {e}") from None
        return types.PluginInfo(f5sync.NAME, f5sync.VERSION, list(_config.subscriptions))

    def handle(self, events):
        config = _config_or_trap()
        host = _Host()
        try:
            outcomes = f5sync.handle(config, host, events)
        except Exception as e:  # a bug: say so and let the host back off
            host.log("error", "f5-bigip failed in handle: " + "".join(traceback.format_exception(e)))
            outcomes = [f5sync.retry(f"f5-bigip internal error: {e!r}")] * len(events)
        return [_outcome(o) for o in outcomes]

    def reconcile(self, cluster, vms):
        return _reconciled(lambda config, host: f5sync.reconcile(config, host, cluster, vms))


def _pages():
    """The inventory of a paged reconcile, page after page."""
    while (page := inventory.next_page()) is not None:
        yield page


def _reconciled(run):
    """Runs a reconcile, its failures as WIT errors."""
    config = _config_or_trap()
    host = _Host()
    try:
        return run(config, host)
    except f5sync.Failure as failure:
        raise Err(failure.outcome[1]) from None
    except Exception as e:
        host.log("error", "f5-bigip failed in reconcile: " + "".join(traceback.format_exception(e)))
        raise Err(f"f5-bigip internal error: {e!r}") from None


class Paged(exports.Paged):
    """The inventory a page at a time (WIT 0.1.2; `kv.commit` 0.1.4)."""

    def reconcile(self, cluster):
        return _reconciled(lambda config, host: f5sync.reconcile_paged(config, host, cluster, _pages()))
