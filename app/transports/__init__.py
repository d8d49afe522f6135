"""The transports: HTTP (``/v1``, the Open Inference Protocol ``/v2``, the web page), PACS (DICOM
listener, DICOMweb) and the command line. They parse and shape; the engine and the core decide."""
