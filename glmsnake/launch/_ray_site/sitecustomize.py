"""Loaded by every Python process of a glmsnake Ray cluster (PYTHONPATH), before Ray.

Some Ray 2.60 servers (the dashboard's and autoscaler's Prometheus endpoints, the metrics
agent's exporter) bind 0.0.0.0 whenever the node address is not 127.0.0.1. Nothing we
start may listen on every interface (only on the node's own address), so a bind to the wildcard
address is redirected to this node's address (GLMSNAKE_BIND_ADDR, set by glmsnake.launch.environment).
"""

import os
import socket

_ADDR = os.environ.get("GLMSNAKE_BIND_ADDR")

if _ADDR:
    _orig_bind = socket.socket.bind

    def _bind(self, address):  # type: ignore[no-untyped-def]
        if (
            isinstance(address, tuple)
            and self.family == socket.AF_INET
            and address
            and address[0] in ("", "0.0.0.0")
        ):
            address = (_ADDR, *address[1:])
        return _orig_bind(self, address)

    socket.socket.bind = _bind  # type: ignore[method-assign]

# Chain to another sitecustomize further down the path, if there is one.
try:
    import importlib.util as _u
    import sys as _sys

    _here = os.path.dirname(os.path.abspath(__file__))
    for _p in _sys.path:
        if os.path.abspath(_p or ".") == _here:
            continue
        _f = os.path.join(_p or ".", "sitecustomize.py")
        if os.path.isfile(_f):
            _spec = _u.spec_from_file_location("_glmsnake_chained_sitecustomize", _f)
            if _spec and _spec.loader:
                _spec.loader.exec_module(_u.module_from_spec(_spec))
            break
except Exception:  # noqa: BLE001 - never break interpreter start-up
    pass
