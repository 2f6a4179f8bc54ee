"""C-ECHO, C-FIND, C-GET, C-MOVE and access control, driven by pynetdicom SCUs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from medzip_scp.config import PeerAE, Right, Settings
from medzip_scp.net.access import AccessPolicy
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode, free_port
from tests.helpers.scu import ct_dataset, move_study, qr_identifier, store, store_study


def test_echo(node: RunningNode) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_wrong_called_ae_is_rejected(node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    with caplog.at_level(logging.WARNING, logger="medzip_scp"):
        assoc = ae.associate(node.host, node.port, ae_title="NOTMEDZIP")
    assert assoc.is_rejected
    assert (
        "association rejected from 127.0.0.1 (A-ASSOCIATE-RJ 1/1/7): called AE 'NOTMEDZIP' is "
        "not ours ('MEDZIP', [node] ae_title); the peer must call that title, or set [access] "
        "check_called_ae = false"
    ) in _warnings(caplog)


@pytest.fixture
def allow_list_only(node_settings: Settings) -> Settings:
    node_settings.access.allow_unknown_ae = False
    node_settings.access.peers = [
        PeerAE(ae_title="MODALITY", rights={Right.ECHO, Right.STORE}),
        PeerAE(ae_title="ELSEWHERE", hosts=["10.1.2.3"], rights=set(Right)),
    ]
    return node_settings


def test_allow_list_and_rights(
    allow_list_only: Settings, node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="medzip_scp")
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assert ae.associate(node.host, node.port, ae_title=node.ae_title).is_rejected
    ae = AE(ae_title="ELSEWHERE")  # known AE, but calling from the wrong host
    ae.add_requested_context(Verification)
    assert ae.associate(node.host, node.port, ae_title=node.ae_title).is_rejected
    assert _warnings(caplog) == [
        "association rejected from 127.0.0.1 (A-ASSOCIATE-RJ 1/1/3): calling AE 'STRANGER' is "
        "not in [[access.peers]] and allow_unknown_ae = false; add it under [[access.peers]] "
        "(see `medzip config example`)",
        "association rejected from 127.0.0.1 (A-ASSOCIATE-RJ 1/1/3): calling AE 'ELSEWHERE' "
        "may call from 10.1.2.3 only, not from 127.0.0.1; add the address to its hosts under "
        "[[access.peers]]",
    ]
    caplog.clear()

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == Status.SUCCESS
    responses = list(
        assoc.send_c_find(
            qr_identifier("STUDY", StudyInstanceUID=""), StudyRootQueryRetrieveInformationModelFind
        )
    )
    assoc.release()
    assert [int(status.Status) for status, _ in responses] == [Status.NOT_AUTHORIZED]
    assert _warnings(caplog) == [
        "refused find for calling AE 'MODALITY' from 127.0.0.1: it lacks the right 'find'; "
        "add it to its rights under [[access.peers]]"
    ]


@pytest.mark.parametrize(
    ("access", "reason"),
    [
        (
            {},
            "calling AE 'VIEWER' is not in [[access.peers]] and 10.0.0.9 is not in [access] "
            "unknown_ae_hosts; add the AE under [[access.peers]] or its network to "
            "unknown_ae_hosts (see `medzip config example`)",
        ),
        (
            {"unknown_ae_hosts": ["10.0.0.0/8"], "unknown_ae_rights": []},
            "calling AE 'VIEWER' is not in [[access.peers]] and [access] unknown_ae_rights is "
            "empty; add it under [[access.peers]] (see `medzip config example`)",
        ),
        (
            {"peers": [{"ae_title": "VIEWER", "rights": []}]},
            "calling AE 'VIEWER' has no rights under [[access.peers]]; add some to its rights "
            "(see `medzip config example`)",
        ),
        ({"unknown_ae_hosts": ["10.0.0.0/8"]}, None),
    ],
)
def test_refusals_name_the_setting_to_change(access: dict, reason: str | None) -> None:
    policy = AccessPolicy(Settings(access=access).access, "MEDZIP")
    assert policy.refusal("VIEWER", "10.0.0.9") == reason


def test_find_one_response_per_study_with_counts(node: RunningNode) -> None:
    study_uid, sent = store_study(node, 3)
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    query = qr_identifier(
        "STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances="", ModalitiesInStudy=""
    )
    results = [
        identifier
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        )
        if status.Status == Status.PENDING
    ]
    assoc.release()
    assert len(results) == 1
    assert results[0].StudyInstanceUID == study_uid
    assert int(results[0].NumberOfStudyRelatedInstances) == 3
    assert results[0].ModalitiesInStudy == sent[0].Modality
    assert "PatientName" not in results[0]  # only requested keys come back


def _find(node: RunningNode, query: Dataset, **associate: object) -> tuple[list[Dataset], Dataset]:
    """The pending identifiers and the final status of one Study Root C-FIND."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, **associate)
    assert assoc.is_established
    responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    pending = [ident for status, ident in responses if status.Status == Status.PENDING]
    return pending, responses[-1][0]


def test_relational_find_and_its_extended_negotiation(node: RunningNode) -> None:
    study_uid, sent = store_study(node, 2)
    relational = SOPClassExtendedNegotiation()
    relational.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    relational.service_class_application_information = b"\x01\x01"  # relational, date-time
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=[relational])
    assert assoc.is_established
    # PS3.4 C.5.1.1: relational queries supported, combined date-time matching not.
    assert assoc.acceptor.sop_class_extended == {
        StudyRootQueryRetrieveInformationModelFind: b"\x01\x00"
    }
    assoc.release()
    # Every CT series of the archive, without a StudyInstanceUID (was refused with 0xA900).
    pending, final = _find(node, qr_identifier("SERIES", Modality="CT", PatientName=""))
    assert final.Status == Status.SUCCESS
    assert [(p.StudyInstanceUID, p.SeriesInstanceUID) for p in pending] == [
        (study_uid, sent[0].SeriesInstanceUID)
    ]
    assert pending[0].PatientName == sent[0].PatientName


@pytest.fixture
def two_answers_at_most(node_settings: Settings) -> Settings:
    node_settings.query.max_answers = 2
    return node_settings


def test_find_answers_at_most_max_answers(two_answers_at_most: Settings, node: RunningNode) -> None:
    study_uid, sent = store_study(node, 3)
    pending, final = _find(
        node, qr_identifier("IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID="")
    )
    assert len(pending) == 2
    assert final.Status == Status.OUT_OF_RESOURCES
    assert "more than 2 matches" in final.ErrorComment
    pending, final = _find(node, qr_identifier("SERIES", StudyInstanceUID=study_uid))
    assert (len(pending), final.Status) == (1, Status.SUCCESS)


def test_find_answers_in_the_requested_character_set(node: RunningNode) -> None:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    sent = {}
    for name in ("chrFren.dcm", "chrH31.dcm", "chrRuss.dcm"):
        ds = dcmread(get_charset_files(name)[0])
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
        sent[ds.PatientID] = ds
    assoc.release()
    # Latin-1, as Orthanc asks by default: the Japanese and Russian names go out in UTF-8.
    query = qr_identifier("STUDY", StudyInstanceUID="", PatientID="", PatientName="")
    query.SpecificCharacterSet = "ISO_IR 100"
    pending, final = _find(node, query)
    assert final.Status == Status.SUCCESS
    got = {p.PatientID: (str(p.PatientName), p.SpecificCharacterSet) for p in pending}
    assert got == {
        "SCSFREN": ("Buc^Jérôme", "ISO_IR 100"),
        "H31EXAMPLE": ("Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192"),
        "SCSRUSS": ("Люкceмбypг", "ISO_IR 192"),
    }
    # A non-ASCII query value, in the character set the query names.
    query = qr_identifier("STUDY", StudyInstanceUID="", PatientName="*山田*")
    query.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    pending, final = _find(node, query)
    assert [str(p.PatientName) for p in pending] == [str(sent["H31EXAMPLE"].PatientName)]
    assert pending[0].SpecificCharacterSet == ["", "ISO 2022 IR 87"]


def test_get_series_by_series_instance_uid_alone(node: RunningNode) -> None:
    _, sent = store_study(node, 2)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae, kwargs = _get_ae([ExplicitVRLittleEndian])
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        **kwargs,
    )
    query = qr_identifier("SERIES", SeriesInstanceUID=sent[0].SeriesInstanceUID)
    responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    assert responses[-1][0].Status == Status.SUCCESS
    assert sorted(received) == sorted(ds.SOPInstanceUID for ds in sent)


def _get_ae(syntaxes: list[str], with_role: bool = True) -> tuple[AE, dict]:
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, syntaxes)
    kwargs: dict = {}
    if with_role:
        kwargs["ext_neg"] = [build_role(CTImageStorage, scp_role=True)]
    return ae, kwargs


@pytest.mark.parametrize(
    ("syntaxes", "with_role"),
    [
        ([ExplicitVRLittleEndian], True),
        ([ImplicitVRLittleEndian], True),
        ([JPEGLSLossless], True),  # only a compressed syntax: the node must transcode
        ([ExplicitVRLittleEndian], False),  # Horos/OsiriX: no role selection
    ],
)
def test_get_returns_identical_pixels(
    node: RunningNode, syntaxes: list[str], with_role: bool
) -> None:
    study_uid, sent = store_study(node, 2)
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae, kwargs = _get_ae(syntaxes, with_role)
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        **kwargs,
    )
    assert assoc.is_established
    if not with_role:
        # Horos accepts C-STOREs on contexts it proposed without role selection; pynetdicom's
        # SCU would refuse them (0x0122), so make this requestor as lenient as Horos.
        for cx in assoc.accepted_contexts:
            cx._as_scp = True
    responses = list(
        assoc.send_c_get(
            qr_identifier("STUDY", StudyInstanceUID=study_uid),
            StudyRootQueryRetrieveInformationModelGet,
        )
    )
    assoc.release()
    final = responses[-1][0]
    assert final.Status == Status.SUCCESS
    assert final.NumberOfCompletedSuboperations == 2
    assert final.NumberOfFailedSuboperations == 0
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    assert set(by_uid) == {ds.SOPInstanceUID for ds in sent}
    for original in sent:
        back = by_uid[original.SOPInstanceUID]
        assert back.file_meta.TransferSyntaxUID == syntaxes[0]
        assert (back.pixel_array == original.pixel_array).all()
        for elem in original:
            if elem.tag != 0x7FE00010:
                assert back[elem.tag].value == elem.value, elem.tag
        if syntaxes[0] != JPEGLSLossless:
            assert back.PixelData == original.PixelData


def test_move_to_configured_destination(
    node: RunningNode, store_scp: tuple[int, list[Dataset]]
) -> None:
    port, received = store_scp
    node.add_move_destination("DEST", "127.0.0.1", port)
    study_uid, sent = store_study(node, 3)
    final = move_study(node, study_uid, "DEST")[-1]
    assert final.Status == Status.SUCCESS
    assert final.NumberOfCompletedSuboperations == 3
    assert sorted(ds.SOPInstanceUID for ds in received) == sorted(ds.SOPInstanceUID for ds in sent)
    for ds in received:
        original = next(s for s in sent if s.SOPInstanceUID == ds.SOPInstanceUID)
        assert ds.PixelData == original.PixelData


def test_move_unknown_destination(node: RunningNode) -> None:
    study_uid, _ = store_study(node, 1)
    final = move_study(node, study_uid, "NOWHERE")[-1]
    assert final.Status == Status.MOVE_DESTINATION_UNKNOWN


def test_move_with_unreachable_destination_fails_cleanly(node: RunningNode, tmp_path: Path) -> None:
    node.add_move_destination("DOWN", "127.0.0.1", free_port())
    study_uid, _ = store_study(node, 1)
    final = move_study(node, study_uid, "DOWN")[-1]
    assert final.Status == Status.MOVE_DESTINATION_UNKNOWN  # 0xA801: cannot associate
    # and the node keeps serving
    assert store(node, ct_dataset()) == Status.SUCCESS
