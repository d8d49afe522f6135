-- Orthanc routing rule: send every stored MR image (MR Image Storage, Enhanced MR Image Storage) to btd's
-- DICOM listener. btd's results (SR, KOS, Secondary Capture) come back from the AE "BTD" and are never
-- routed again. The modality "btd" is declared in DicomModalities (see the README's PACS section).
MR_IMAGE_STORAGE = { ['1.2.840.10008.5.1.4.1.1.4'] = true, ['1.2.840.10008.5.1.4.1.1.4.1'] = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  if MR_IMAGE_STORAGE[metadata['SopClassUid']] and origin['RemoteAet'] ~= 'BTD' then
    SendToModality(instanceId, 'btd')
  end
end
