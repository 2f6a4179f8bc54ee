"""DICOM TLS (server and mutual authentication) and C-CANCEL of a running C-FIND."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from medzip_scp.config import Settings
from medzip_scp.index.ingest import StorageFacts, add_instance, attributes_from_dataset
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset
from tests.helpers.tls import client_context, echo

STUDIES = 600


@pytest.fixture
def mutual_tls(node_settings: Settings, pki: dict[str, Path]) -> Settings:
    node_settings.tls.enabled = True
    node_settings.tls.certificate = pki["node_cert"]
    node_settings.tls.private_key = pki["node_key"]
    node_settings.tls.ca_certificates = pki["ca"]
    node_settings.tls.require_client_certificate = True
    return node_settings


def test_mutual_tls(mutual_tls: Settings, node: RunningNode, pki: dict[str, Path]) -> None:
    assert echo(node, (client_context(pki, with_cert=True), "localhost"))
    assert not echo(node, (client_context(pki, with_cert=False), "localhost"))
    assert not echo(node, None)  # plain DICOM on a TLS port


def test_cancel_stops_a_running_find(node: RunningNode) -> None:
    # Index many studies directly (C-FIND reads only the index), so that the node is still
    # answering when the cancel arrives.
    with node.archive.sessions() as session:
        for _ in range(STUDIES):
            ds = ct_dataset(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
            add_instance(
                session,
                attributes_from_dataset(ds),
                StorageFacts(
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    blob_key="0" * 32,
                    original_size=0,
                    original_sha256="0" * 64,
                    stored_size=0,
                    stored_sha256="0" * 64,
                    codec_id="part10",
                    calling_ae_title="TEST",
                ),
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
    assert statuses[-1] == Status.CANCEL, (len(statuses), statuses[:3], statuses[-3:])
    assert statuses.count(Status.PENDING) < STUDIES


def test_silent_client_does_not_hold_up_tls_associations(
    mutual_tls: Settings, node: RunningNode, pki: dict[str, Path]
) -> None:
    """The TLS handshake runs in the association's thread: a client that connects and says
    nothing must not stop the node from accepting others."""
    with socket.create_connection((node.host, node.port)):
        assert echo(node, (client_context(pki, with_cert=True), "localhost"))
