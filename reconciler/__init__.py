"""reconciler: diode ingest stream -> Postgres inbox -> NetBox, through the diode NetBox plugin."""

__version__ = "0.1.0"
