"""Reviews: a clinician's confirmation or correction of each label, kept in an append-only, Alembic-versioned store
(``store.py``; migrations in ``migrations/``), served by ``cxrclip serve`` (``POST /v1/reviews``) and exported as a
CGMH CSV (``cxrclip reviews export``)."""
