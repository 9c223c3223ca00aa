"""The local web app and REST API (``cxrclip serve``)."""
