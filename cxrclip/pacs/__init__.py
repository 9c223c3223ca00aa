"""The PACS worker (``cxrclip pacs``): DICOMweb in, DICOM Comprehensive SR out, a job store for exactly-once.
``sr.py`` builds and reads the SR (also used by ``inference.py --sr_out``), ``dicomweb.py`` talks to the server,
``store.py`` keeps the jobs (SQLAlchemy), ``worker.py`` is the loop and the command line."""
