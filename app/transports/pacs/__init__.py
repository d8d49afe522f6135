"""PACS integration: DICOM result objects (SR + CAM overlay), the DICOM listener (``btd dicom-listen``)
and the DICOMweb round trip. Transport-free builders; pydicom / highdicom / pynetdicom do the DICOM."""
