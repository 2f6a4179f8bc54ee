"""Files given a patient's identity, sent to a running node as they are, and got back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet

from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode, c_get, sending_files_as_they_are


def with_identity(source: Path, target: Path, identity: Mapping[str, str]) -> Path:
    """``source`` with ``identity`` (keyword: value) set and a SOP Instance UID of its own
    (the data sets hold copies of one object in several syntaxes), written to ``target``."""
    ds = dcmread(source)
    for keyword, value in identity.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target, enforce_file_format=True)
    return target


def contexts_of(paths: Iterable[Path]) -> set[tuple[str, str]]:
    """(SOP Class UID, Transfer Syntax UID) of each file."""
    found = set()
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        found.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    return found


def send_files(node: RunningNode, paths: list[Path]) -> dict[Path, int]:
    """C-STORE each file's data set exactly as its bytes are, in one association; returns
    each file's status."""
    ae = AE(ae_title="STORESCU")
    for sop_class, syntax in sorted(contexts_of(paths)):
        ae.add_requested_context(sop_class, [syntax])
    statuses = {}
    with sending_files_as_they_are():
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            for path in paths:
                statuses[path] = int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    return statuses


def get_data_sets(
    node: RunningNode,
    query: Dataset,
    contexts: set[tuple[str, str]],
    model: str = PatientRootQueryRetrieveInformationModelGet,
) -> tuple[Dataset, Dataset | None, dict[str, bytes]]:
    """C-GET ``query``, accepting ``contexts``; returns the final response, its identifier
    and each arrived instance's data set bytes (behind its File Meta) by SOP Instance UID."""
    arrived: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        # the node in this process spools arriving data sets to files, as they were sent
        raw = Path(event.dataset_path).read_bytes()
        arrived[str(event.request.AffectedSOPInstanceUID)] = raw[dataset_offset_of(raw) :]
        return Status.SUCCESS

    responses = c_get(node, query, on_store, contexts, model)
    final, identifier = responses[-1]
    return final, identifier, arrived


def get_patient(
    node: RunningNode, patient_id: str, contexts: set[tuple[str, str]]
) -> tuple[Dataset, Dataset | None, dict[str, bytes]]:
    """C-GET every instance of a patient (Patient Root, PATIENT level): see
    :func:`get_data_sets`."""
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = patient_id
    return get_data_sets(node, query, contexts)
