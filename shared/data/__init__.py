"""Data readers (MedMNIST npz, MONAI datalists, synthetic) and partitioning."""

from medfed.shared.data.base import DataError, DataSplits, ImageSet

__all__ = ["DataError", "DataSplits", "ImageSet"]
