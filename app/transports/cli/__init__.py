"""The command line: ``btd`` and its service-side commands (``predict``, the PACS commands)."""
