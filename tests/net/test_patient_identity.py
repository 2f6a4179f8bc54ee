"""Objects without Patient ID, stored through the node: C-FIND answers each study with
the patient attributes it was sent with (they must not be merged into one patient)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset, store


def _find(node: RunningNode, model: str, level: str, **keys: str) -> list[Dataset]:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(query, model))
    finally:
        assoc.release()
    assert int(responses[-1][0].Status) == Status.SUCCESS
    return [identifier for status, identifier in responses if status.Status == Status.PENDING]


def test_studies_without_patient_id_keep_their_own_patient(node: RunningNode) -> None:
    sent = {
        "Alpha^Ann": ct_dataset(PatientID="", PatientName="Alpha^Ann", PatientBirthDate="19610101",
                                StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid()),
        "Beta^Bob": ct_dataset(PatientID="", PatientName="Beta^Bob", PatientBirthDate="19720202",
                               StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid()),
    }  # fmt: skip
    for ds in sent.values():
        assert store(node, ds) == Status.SUCCESS
    expected = {
        (str(ds.PatientName), ds.PatientBirthDate, ds.StudyInstanceUID) for ds in sent.values()
    }

    studies = _find(
        node, StudyRootQueryRetrieveInformationModelFind, "STUDY",
        StudyInstanceUID="", PatientName="", PatientBirthDate="", PatientID="",
    )  # fmt: skip
    assert {(str(r.PatientName), r.PatientBirthDate, r.StudyInstanceUID) for r in studies} == (
        expected
    )

    patients = _find(
        node, PatientRootQueryRetrieveInformationModelFind, "PATIENT",
        PatientID="", PatientName="", PatientBirthDate="", NumberOfPatientRelatedStudies="",
    )  # fmt: skip
    assert sorted(
        (str(r.PatientName), r.PatientBirthDate, int(r.NumberOfPatientRelatedStudies))
        for r in patients
    ) == [("Alpha^Ann", "19610101", 1), ("Beta^Bob", "19720202", 1)]

    # Patient Root, STUDY level under the empty Patient ID: each study once, as sent.
    studies = _find(
        node, PatientRootQueryRetrieveInformationModelFind, "STUDY",
        PatientID="", StudyInstanceUID="",
    )  # fmt: skip
    assert sorted(r.StudyInstanceUID for r in studies) == sorted(u for *_, u in expected)
