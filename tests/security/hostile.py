"""Hostile servers for the security tests: raw sockets on 127.0.0.1 whose every byte a test decides.

``HostileServer`` reads one HTTP/1.1 request per connection and hands it to the test's ``handler``, which
writes whatever it likes to the socket (lies, dribbles, redirects, silence). With ``tls=`` it speaks TLS
and plain HTTP on the same port, told apart by the first byte, so that ``https://host:P`` can redirect
to ``http://host:P``: the same host and port, another scheme. ``make_tls`` creates a test CA and a server
certificate for 127.0.0.1 with ``cryptography``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    tls: bool


@dataclass
class Client:
    """One accepted connection: the request read from it and the socket to answer on."""

    request: Request
    sock: socket.socket
    closed_by_peer: threading.Event = field(default_factory=threading.Event)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_for_close(self, timeout: float = 10) -> None:
        """Read (and drop) whatever comes until the client closes the connection."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (OSError, ssl.SSLError):
            pass


Handler = Callable[[Client], None]


class HostileServer:
    """Answers each request with ``handler(client)``; records requests; closes everything on ``close``."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler, self._tls = handler, tls
        self.requests: list[Request] = []
        self.peer_closed: list[threading.Event] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, name="hostile-accept", daemon=True)
        self._acceptor.start()

    def url(self, path: str, scheme: str = "http", userinfo: str = "", query: str = "") -> str:
        auth = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{path.lstrip('/')}" + (f"?{query}" if query else "")

    def targets(self) -> list[str]:
        with self._lock:
            return [r.target for r in self.requests]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), name="hostile-conn", daemon=True)
            with self._lock:
                self._threads.append(thread)
                self._clients.append(sock)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(30)
            tls = False
            if self._tls is not None and sock.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS ClientHello
                sock = self._tls.wrap_socket(sock, server_side=True)
                tls = True
                with self._lock:
                    self._clients.append(sock)
            request = _read_request(sock, tls)
            if request is None:
                return
            closed = threading.Event()
            with self._lock:
                self.requests.append(request)
                self.peer_closed.append(closed)
            client = Client(request, sock, closed)
            self.handler(client)
            _watch_close(sock, closed, self._stop)
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            clients, threads = list(self._clients), list(self._threads)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for thread in threads:
            thread.join(5)
        self._listener.close()
        for sock in clients:
            sock.close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_request(sock: socket.socket, tls: bool) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, target, _ = head[0].split(" ", 2)
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(method, target, headers, tls)


def _watch_close(sock: socket.socket, closed: threading.Event, stop: threading.Event) -> None:
    """After the answer: wait until the client closes its end (or the server stops)."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(65536):
                break
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            break
    closed.set()


def answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def ranged(data: bytes, request: Request, *, declared: int | None = None) -> bytes:
    """A correct answer to a (ranged) GET of ``data``; ``declared`` lies about the object's size."""
    match = _RANGE.fullmatch(request.headers.get("range", ""))
    total = len(data) if declared is None else declared
    if not match:
        return answer("200 OK", {"Content-Length": str(len(data)), "Connection": "close"}, data)
    start = int(match.group(1))
    end = min(int(match.group(2)) + 1 if match.group(2) else total, total)
    body = data[start:end]
    headers = {
        "Content-Range": f"bytes {start}-{end - 1}/{total}",
        "Content-Length": str(len(body)) if declared is None else str(end - start),
        "ETag": '"v1"',
        "Connection": "close",
    }
    return answer("206 Partial Content", headers, body)


def files_handler(files: dict[str, bytes], *, required_query: str | None = None) -> Handler:
    """Serve ``files`` by path; 404 otherwise; with ``required_query``, 403 to a request without it (as a
    presigned URL's store answers a path its signature does not cover)."""

    def handle(client: Client) -> None:
        path, _, query = client.request.target.partition("?")
        if required_query is not None and query != required_query:
            client.send(answer("403 Forbidden", {"Content-Length": "0", "Connection": "close"}))
        elif path.lstrip("/") in files:
            client.send(ranged(files[path.lstrip("/")], client.request))
        else:
            client.send(answer("404 Not Found", {"Content-Length": "0", "Connection": "close"}))

    return handle


@dataclass
class Tls:
    server: ssl.SSLContext
    ca_file: Path


def make_tls(folder: Path) -> Tls:
    """A test CA and a certificate for 127.0.0.1 and localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stream_st test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return Tls(context, ca_file)
