"""DICOM TLS (server and mutual authentication) and C-CANCEL of a running C-FIND."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from medzip_scp.config import Settings
from medzip_scp.index.ingest import add_instance, attributes_from_dataset
from medzip_scp.net.status import Status
from tests.net.conftest import RunningNode
from tests.net.test_store import ct_dataset

STUDIES = 600


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


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key, ca_cert, _, ca_path = _key_and_cert(tmp_path, "ca", None)
    _, _, node_key, node_cert = _key_and_cert(tmp_path, "node", (ca_key, ca_cert))
    _, _, client_key, client_cert = _key_and_cert(tmp_path, "client", (ca_key, ca_cert))
    return {
        "ca": ca_path,
        "node_key": node_key,
        "node_cert": node_cert,
        "client_key": client_key,
        "client_cert": client_cert,
    }


@pytest.fixture
def mutual_tls(node_settings: Settings, pki: dict[str, Path]) -> Settings:
    node_settings.tls.enabled = True
    node_settings.tls.certificate = pki["node_cert"]
    node_settings.tls.private_key = pki["node_key"]
    node_settings.tls.ca_certificates = pki["ca"]
    node_settings.tls.require_client_certificate = True
    return node_settings


def _client_context(pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if with_cert:
        context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return context


def _echo(node: RunningNode, tls: tuple[ssl.SSLContext, str] | None) -> bool:
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, tls_args=tls)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()
    return ok


def test_mutual_tls(mutual_tls: Settings, node: RunningNode, pki: dict[str, Path]) -> None:
    assert _echo(node, (_client_context(pki, with_cert=True), "localhost"))
    assert not _echo(node, (_client_context(pki, with_cert=False), "localhost"))
    assert not _echo(node, None)  # plain DICOM on a TLS port


def test_cancel_stops_a_running_find(node: RunningNode) -> None:
    # Index many studies directly (C-FIND reads only the index), so that the node is still
    # answering when the cancel arrives.
    with node.archive.sessions() as session:
        for _ in range(STUDIES):
            ds = ct_dataset(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
            add_instance(
                session,
                attributes_from_dataset(ds),
                transfer_syntax_uid=ExplicitVRLittleEndian,
                blob_key="0" * 32,
                original_size=0,
                original_sha256="0" * 64,
                stored_size=0,
                stored_sha256="0" * 64,
                codec_id="part10",
                calling_ae_title="TEST",
            )
        session.commit()
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7)
    statuses = []
    for status, _identifier in responses:
        statuses.append(int(status.Status))
        if len(statuses) == 1:
            context_id = assoc.accepted_contexts[0].context_id
            assoc.send_c_cancel(7, context_id)
    assoc.release()
    assert statuses[-1] == Status.CANCEL
    assert statuses.count(Status.PENDING) < STUDIES
