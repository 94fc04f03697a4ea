"""Online reconstruction service: MRD streaming server and client, dependency store,
SNR-bounded raw-data compression, Prometheus metrics."""

from .client import Reply, client_tls_context, exchange, read_mrd_file, save_reply, send_scan
from .compression import decode_samples, encode_samples, quantiser_step
from .handlers import HANDLERS, check_b1_map, register, resolve
from .mrd_images import ImageGeometry, image_geometry
from .protocol import Limits, Message, MessageId, MessageReader
from .server import Server, run_server, tls_context
from .session import Session, SessionBudget
from .store import DependencyKey, DirectoryStore, find_dependency, key_from_header

__all__ = [
    "Server",
    "Session",
    "SessionBudget",
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
    "find_dependency",
    "check_b1_map",
    "ImageGeometry",
    "image_geometry",
    "HANDLERS",
    "register",
    "resolve",
]
