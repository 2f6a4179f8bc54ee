"""DICOM TLS test helpers: a throw-away PKI and a C-ECHO over TLS."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from medzip_scp.net.status import Status


class Node(Protocol):
    host: str
    port: int
    ae_title: str


def _key_and_cert(
    tmp: Path, name: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_path, cert_path = tmp / f"{name}.key", tmp / f"{name}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, key_path, cert_path


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, and a node's and a client's key and certificate signed by it, in ``directory``
    (the ``pki`` fixture)."""
    ca_key, ca_cert, _, ca_path = _key_and_cert(directory, "ca", None)
    _, _, node_key, node_cert = _key_and_cert(directory, "node", (ca_key, ca_cert))
    _, _, client_key, client_cert = _key_and_cert(directory, "client", (ca_key, ca_cert))
    return {
        "ca": ca_path,
        "node_key": node_key,
        "node_cert": node_cert,
        "client_key": client_key,
        "client_cert": client_cert,
    }


def client_context(pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if with_cert:
        context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return context


def echo(node: Node, tls: tuple[ssl.SSLContext, str] | None) -> bool:
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, tls_args=tls)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()
    return ok
