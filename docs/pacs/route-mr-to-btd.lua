-- Orthanc routing rule: send every stored MR slice (MR Image Storage) to btd's DICOM listener.
-- btd's results (SR, Secondary Capture) come back from the AE "BTD" and are never routed again.
-- The modality "btd" is declared in DicomModalities (see the README's PACS section).
MR_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.4'

function OnStoredInstance(instanceId, tags, metadata, origin)
  if metadata['SopClassUid'] == MR_IMAGE_STORAGE and origin['RemoteAet'] ~= 'BTD' then
    SendToModality(instanceId, 'btd')
  end
end
