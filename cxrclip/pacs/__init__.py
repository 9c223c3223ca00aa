"""The PACS worker (``cxrclip pacs``): DICOMweb in, IHE AI Results out, a job store for exactly-once.
``sr.py`` builds and reads the TID 1500 SR, ``seg.py`` the Segmentation of where the model looked, ``answer.py``
puts them together (also for ``inference.py --sr_out``), ``assessment.py`` is a reader's review as a verified SR,
``dicomweb.py`` talks to the server, ``store.py`` keeps the jobs (SQLAlchemy), ``worker.py`` is the loop and the
command line."""
