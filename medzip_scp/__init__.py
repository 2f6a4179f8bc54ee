"""medzip: a lossless DICOM archive node."""

__version__ = "0.1.0"
