"""CSV → record → dataset → collate: the data half of the pipeline."""
