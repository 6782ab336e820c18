"""HTTP authentication with real clients: the bearer token (401 before any body is read, health
probes open), HTTPS and mutual TLS through tritonclient, and the warning for an exposed API."""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from geventhttpclient.response import HTTPConnectionClosed
from tritonclient.utils import InferenceServerException

from edge_runtime.config.settings import HttpSettings
from edge_runtime.core.errors import UsageError
from edge_runtime.fleet.certs import CertRole, make_ca, make_cert
from edge_runtime.transports.http.server import HttpServer
from tests.broker import mlp_dataplane
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward

TOKEN = "t0ken-with-enough-entropy-4f9a2c"


@pytest.fixture
def dataplane(tmp_path: Path, signing_keys, device_profile, mlp_bundle_factory) -> object:
    """A real DataPlane serving the MLP 'mlp'."""
    return mlp_dataplane(tmp_path / "store", signing_keys, device_profile, mlp_bundle_factory("mlp", "1"))


@pytest.fixture
def serve(dataplane: object) -> Iterator[object]:
    """Start an HttpServer on a free loopback port with the given settings; stopped after the test."""
    servers: list[HttpServer] = []

    def start(**fields: object) -> HttpServer:
        server = HttpServer(dataplane, dataclasses.replace(HttpSettings(port=0), **fields))  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _infer(client: triton.InferenceServerClient, **options: object) -> np.ndarray:
    x = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = client.infer("mlp", [tensor], **options).as_numpy(OUTPUT_NAME)
    np.testing.assert_allclose(got, reference_forward(make_weights(seed=0), x), rtol=1e-5, atol=1e-6)
    return got


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bearer_token_guards_everything_but_the_probes(tmp_path: Path, serve) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    server = serve(token_file=str(tmp_path / "token"))
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    _infer(client, headers={"Authorization": f"Bearer {TOKEN}"})
    _infer(client, headers={"authorization": f"bearer {TOKEN}"})  # the scheme is case-insensitive
    for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):  # fmt: skip
        with pytest.raises(InferenceServerException) as refused:
            _infer(triton.InferenceServerClient(f"127.0.0.1:{server.port}"), headers=headers)
        assert "bearer token" in str(refused.value), refused.value
    assert client.is_server_live() and client.is_server_ready()  # probes need no token
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("mlp")
    metrics = _raw(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert metrics.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and b"WWW-Authenticate: Bearer" in metrics
    # A 1 GB upload without the token is answered 401 from its head alone: nothing is reserved or read.
    huge = _raw(
        server.port, b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    assert huge.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in huge
    stats = server.stats()
    assert stats["pending_body_bytes"] == 0 and stats["events"]["unauthorized"] >= 6


def test_token_file_that_cannot_serve_is_refused(tmp_path: Path, dataplane: object) -> None:
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(UsageError, match="at least 16 characters"):
        HttpServer(dataplane, HttpSettings(port=0, token_file=str(tmp_path / "short")))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"cannot read http\.token_file"):
        HttpServer(dataplane, HttpSettings(port=0, token_file=str(tmp_path / "none")))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the server's certificate for 127.0.0.1, a client certificate, and a rogue CA's client."""
    root = tmp_path_factory.mktemp("pki")
    make_ca(root)
    make_cert(root, "server", root, role=CertRole.SERVER, hosts=("127.0.0.1",))
    make_cert(root, "operator", root, role=CertRole.OPERATOR)
    make_ca(root / "rogue")
    make_cert(root / "rogue", "operator", root / "rogue", role=CertRole.OPERATOR)
    return root


def test_https_and_mutual_tls_with_tritonclient(pki: Path, serve) -> None:
    server = serve(cert_file=str(pki / "server.crt"), key_file=str(pki / "server.key"),
                   client_ca_file=str(pki / "ca.crt"))  # fmt: skip
    url = f"127.0.0.1:{server.port}"
    good = {
        "ca_certs": str(pki / "ca.crt"),
        "certfile": str(pki / "operator.crt"),
        "keyfile": str(pki / "operator.key"),
    }
    _infer(triton.InferenceServerClient(url, ssl=True, ssl_options=good))
    refused = [
        {"ca_certs": str(pki / "ca.crt")},  # no client certificate
        {
            **good,
            "certfile": str(pki / "rogue" / "operator.crt"),
            "keyfile": str(pki / "rogue" / "operator.key"),
        },
    ]
    for options in refused:
        with pytest.raises((ssl.SSLError, OSError, HTTPConnectionClosed, InferenceServerException)):
            _infer(triton.InferenceServerClient(url, ssl=True, ssl_options=options, connection_timeout=10))
    with pytest.raises(
        (OSError, HTTPConnectionClosed, InferenceServerException)
    ):  # plain HTTP to the TLS port
        _infer(triton.InferenceServerClient(url, connection_timeout=10, network_timeout=10))
    with pytest.raises(
        (ssl.SSLError, OSError, HTTPConnectionClosed, InferenceServerException)
    ):  # a client that trusts another CA
        _infer(
            triton.InferenceServerClient(
                url, ssl=True, ssl_options={**good, "ca_certs": str(pki / "rogue" / "ca.crt")}
            )
        )
    _infer(triton.InferenceServerClient(url, ssl=True, ssl_options=good))  # still serving
    assert server.stats()["events"]["tls_refused"] >= 3


def test_https_with_token_and_no_client_certificate(pki: Path, tmp_path: Path, serve) -> None:
    (tmp_path / "token").write_text(TOKEN)
    server = serve(
        cert_file=str(pki / "server.crt"),
        key_file=str(pki / "server.key"),
        token_file=str(tmp_path / "token"),
    )
    client = triton.InferenceServerClient(
        f"127.0.0.1:{server.port}", ssl=True, ssl_options={"ca_certs": str(pki / "ca.crt")}
    )
    _infer(client, headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(InferenceServerException, match="bearer token"):
        _infer(client)


def test_warning_when_reachable_without_authentication(
    tmp_path: Path, serve, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    caplog.set_level(logging.WARNING, logger="edge_runtime.transports.http.server")
    serve(host="0.0.0.0")
    exposed = [record for record in caplog.records if "without authentication" in record.getMessage()]
    assert len(exposed) == 1 and "http.token_file" in exposed[0].getMessage()
    caplog.clear()
    serve(host="0.0.0.0", token_file=str(tmp_path / "token"))
    serve(host="127.0.0.1")
    assert not [record for record in caplog.records if "without authentication" in record.getMessage()]
