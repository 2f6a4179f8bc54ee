"""DIMSE status codes the node returns, by name (PS3.4 Annex B and C, PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01  # C-FIND: optional keys not supported
    CANCEL = 0xFE00
    WARNING_SUBOPERATIONS = 0xB000  # C-GET/C-MOVE: some sub-operations failed
    # C-STORE failures
    DUPLICATE_SOP_INSTANCE = 0x0111  # a differing copy of this SOP Instance is already stored
    OUT_OF_RESOURCES = 0xA700
    DATASET_SOP_CLASS_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_UNDERSTAND_MISSING_ATTRIBUTE = 0xC001
    CANNOT_UNDERSTAND_PIXEL_DATA = 0xC002
    CANNOT_UNDERSTAND_SOP_INSTANCE_MISMATCH = 0xC003
    CANNOT_UNDERSTAND_INVALID_UID = 0xC004  # a UID no C-FIND or C-GET could name
    NOT_AUTHORIZED = 0x0124  # refused: not authorised (PS3.7 C.5.x)
    # Query/Retrieve failures
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # alias of DATASET_SOP_CLASS_MISMATCH
    UNABLE_TO_PROCESS = 0xC101  # C-FIND/C-GET/C-MOVE "unable to process" (Cxxx)
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
