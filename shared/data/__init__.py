"""Data readers (MedMNIST npz, MONAI datalists, synthetic) and partitioning."""

from shared.data.base import DataError, DataSplits, ImageSet

__all__ = ["DataError", "DataSplits", "ImageSet"]
