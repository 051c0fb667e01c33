"""Writing RefLiver-Synth volumes: NIfTI (nibabel) and a DICOM CT series (pydicom), atomically and byte-stable.

Geometry (both formats): a volume is an array (Z, H, W), slice 0 the most caudal (the first along the slice
normal, towards the head, as DICOM readers sort a series), row 0 anterior, column 0 the patient's right
(radiological view, as every 2D slice). In patient coordinates (LPS, mm: +x patient's left, +y posterior, +z head)
voxel (k, row, col) sits at ``x = (col + 0.5 - W / 2) * s``, ``y = (row + 0.5 - H / 2) * s`` (the 2D grid's mm,
centred on the image) and ``z = (k - (Z - 1) / 2) * dz``.

- NIfTI stores the voxels as (i, j, k) = (col, row, slice) with the RAS affine
  ``diag(-s, -s, dz)`` and offset ``((W / 2 - 0.5) s, (H / 2 - 0.5) s, -(Z - 1) / 2 dz)`` as both qform and sform
  (code 1, scanner), units mm: ``nib.aff2axcodes`` reads ``('L', 'P', 'S')``; ``array[k]`` of the
  (z, y, x) order the lsms NIfTI reader uses is slice ``k`` as displayed.
- DICOM: one file per slice ``IM0000.dcm`` ... (InstanceNumber ``k + 1``), ImageOrientationPatient
  ``[1, 0, 0, 0, 1, 0]``, ImagePositionPatient the centre of pixel (0, 0) at its ``z``, PixelSpacing ``[s, s]``,
  SliceThickness = SpacingBetweenSlices = ``dz``; stored unsigned with RescaleIntercept -1024, RescaleSlope 1
  (HU = stored - 1024). UIDs are ``2.25.<n>`` of name-based UUIDs of the seed, the patient and the role
  (study, series, frame of reference, slice k), so the same seed writes the same series.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

HU_OFFSET = 1024  # DICOM stores HU + 1024 as unsigned 16 bit (RescaleIntercept -1024)


def lps_origin(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    """Patient position (LPS mm) of the centre of voxel (0, 0, 0) of a (Z, H, W) volume with spacing (dz, s, s)."""
    z, h, w = shape
    dz, sr, sc = spacing
    return (0.5 - w / 2) * sc, (0.5 - h / 2) * sr, -(z - 1) / 2 * dz


def nifti_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """The RAS voxel -> mm affine of a (Z, H, W) volume stored as (col, row, slice) (see the module notes)."""
    x0, y0, z0 = lps_origin(shape, spacing)
    dz, sr, sc = spacing
    return np.array([[-sc, 0.0, 0.0, -x0], [0.0, -sr, 0.0, -y0], [0.0, 0.0, dz, z0], [0.0, 0.0, 0.0, 1.0]])


def save_nifti(path: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Writes a (Z, H, W) volume as ``.nii.gz`` (temporary file, then ``os.replace``)."""
    import nibabel as nib

    affine = nifti_affine(volume.shape, spacing)
    img = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine)  # (Z, H, W) -> (x=col, y=row, z)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def dicom_uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID (the decimal of a name-based UUID, PS3.5 B.2) from ``parts`` (seed, patient,
    role)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, '/'.join(['lsms-synth', *(str(p) for p in parts)])).int}"


def write_dicom_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float], seed: int,
                       patient: str) -> None:
    """Writes an int16 HU (Z, H, W) volume as a CT series in ``folder`` (one file per slice, see the module notes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    nz, h, w = volume.shape
    dz, sr, sc = spacing
    x0, y0, z0 = lps_origin(volume.shape, spacing)
    study, series, frame = (dicom_uid(seed, patient, role) for role in ("study", "series", "frame"))
    for k in range(nz):
        sop = dicom_uid(seed, patient, "slice", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "CT", "lsms synth (RefLiver-Synth)", "portal venous"
        ds.PatientName, ds.PatientID = patient, patient
        ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.PatientPosition = "HFS"
        z = z0 + k * dz
        ds.ImagePositionPatient = [round(x0, 6), round(y0, 6), round(z, 6)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z, 6)
        ds.PixelSpacing = [round(sr, 6), round(sc, 6)]
        ds.SliceThickness = ds.SpacingBetweenSlices = round(dz, 6)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = h, w
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -HU_OFFSET, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 50, 400
        ds.PixelData = (volume[k].astype(np.int32) + HU_OFFSET).clip(0, 65535).astype("<u2").tobytes()
        path = folder / f"IM{k:04d}.dcm"
        tmp = folder / f".IM{k:04d}.dcm.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
