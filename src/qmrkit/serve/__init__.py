"""Online reconstruction service: MRD streaming server and client, dependency store,
SNR-bounded raw-data compression, Prometheus metrics."""

from .client import Reply, client_tls_context, exchange, read_mrd_file, save_reply, send_scan
from .compression import decode_samples, encode_samples, quantiser_step
from .handlers import HANDLERS, register, resolve
from .protocol import Limits, Message, MessageId, MessageReader
from .server import Server, Session, run_server, tls_context
from .store import DependencyKey, DirectoryStore, key_from_header

__all__ = [
    "Server",
    "Session",
    "run_server",
    "tls_context",
    "Limits",
    "Message",
    "MessageId",
    "MessageReader",
    "exchange",
    "send_scan",
    "Reply",
    "client_tls_context",
    "read_mrd_file",
    "save_reply",
    "encode_samples",
    "decode_samples",
    "quantiser_step",
    "DirectoryStore",
    "DependencyKey",
    "key_from_header",
    "HANDLERS",
    "register",
    "resolve",
]
