"""`edgectl certs` output, and the settings' TLS, token and password files checked at start: each
problem is one readable line and exit 2 before anything binds a port."""

from __future__ import annotations

import socket
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.cli import cli
from tests.broker import write_daemon_config


def test_certs_cli_mints_a_fleet(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ca"
    assert runner.invoke(cli, ["certs", "ca", "-o", str(out)]).exit_code == 0
    device = runner.invoke(cli, ["certs", "device", "gw-7", "--ca", str(out), "-o", str(tmp_path / "gw")])
    assert device.exit_code == 0, device.output
    cert = x509.load_pem_x509_certificate((tmp_path / "gw" / "gw-7.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-7"
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (tmp_path / "gw" / "gw-7.key").stat().st_mode & 0o777 == 0o600
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600
    server = runner.invoke(cli, ["certs", "broker", "--host", "10.0.0.5", "--host", "mqtt.local", "--ca", str(out),
                                 "-o", str(out)])  # fmt: skip
    assert server.exit_code == 0, server.output
    names = x509.load_pem_x509_certificate(
        (out / "broker.crt").read_bytes()
    ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["mqtt.local"]
    again = runner.invoke(cli, ["certs", "device", "gw-7", "--ca", str(out), "-o", str(tmp_path / "gw")])
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.strip().splitlines()) == 1
    for bad in (["device", "gw/evil"], ["device", "+"], ["operator", "a#b"]):
        result = runner.invoke(cli, ["certs", *bad, "--ca", str(out), "-o", str(tmp_path / "x")])
        assert result.exit_code == 2 and "cannot be used in an MQTT topic" in result.output, result.output
    no_ca = runner.invoke(
        cli, ["certs", "device", "gw-8", "--ca", str(tmp_path / "nope"), "-o", str(tmp_path)]
    )
    assert no_ca.exit_code == 2 and "cannot load the CA" in no_ca.output
    assert not (tmp_path / "x").exists()


def test_serve_refuses_unusable_tls_files_before_binding(tmp_path: Path, signing_keys) -> None:
    (tmp_path / "store").mkdir()
    runner = CliRunner()
    CliRunner().invoke(cli, ["certs", "ca", "-o", str(tmp_path / "ca")])
    CliRunner().invoke(
        cli, ["certs", "device", "d1", "--ca", str(tmp_path / "ca"), "-o", str(tmp_path / "ca")]
    )
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    ca, crt, key = tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "d1.crt", tmp_path / "ca" / "d1.key"
    other_key = tmp_path / "ca" / "ca.key"
    cases = [
        ("[mqtt]", f'cert_file = "{crt}"', "mqtt.cert_file and mqtt.key_file go together"),
        ("[mqtt]", 'ca_file = "missing-ca.crt"', "mqtt.ca_file '" + str(tmp_path / "missing-ca.crt")),
        ("[mqtt]", f'ca_file = "{tmp_path / "garbage.pem"}"', "holds no usable PEM certificate"),
        ("[mqtt]", f'cert_file = "{crt}"\nkey_file = "{other_key}"', "do not load as a PEM certificate and its"),
        ("[mqtt]", 'password_file = "nope.txt"', "mqtt.password_file"),
        ("[http]", 'token_file = "token.txt"', "http.token_file"),
        ("[http]", f'cert_file = "{crt}"', "http.cert_file and http.key_file go together"),
        ("[http]", f'client_ca_file = "{ca}"', "http.client_ca_file (mutual TLS) needs http.cert_file"),
        ("[http]", f'cert_file = "{crt}"\nkey_file = "{key}"\nclient_ca_file = "{tmp_path / "garbage.pem"}"',
         "http.client_ca_file"),
    ]  # fmt: skip
    try:
        for table, lines, fragment in cases:
            config = write_daemon_config(tmp_path / "edge.toml", device_id="d1", store=tmp_path / "store",
                                         public_key=signing_keys.public_path, mqtt_port=1, http_port=port)  # fmt: skip
            config.write_text(config.read_text().replace(f"{table}\n", f"{table}\n{lines}\n"))
            result = runner.invoke(cli, ["serve", "--config", str(config)])
            assert result.exit_code == 2 and fragment in result.output, (lines, result.output)
            assert len(result.output.strip().splitlines()) == 1 and "cannot listen" not in result.output
    finally:
        busy.close()
