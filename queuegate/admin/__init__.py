"""The admin socket: a local control and observation channel for `queuegate admin` and `queuegate top`."""

from queuegate.admin.client import AdminClient, AdminUnavailable
from queuegate.admin.server import AdminServer, AdminSocketError, SocketInUse, claim_admin_socket

__all__ = ["AdminClient", "AdminServer", "AdminSocketError", "AdminUnavailable", "SocketInUse", "claim_admin_socket"]
