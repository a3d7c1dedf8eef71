"""Lightning callbacks of the plugins (one class per module); import them from their modules
or from the top-level package, e.g. ``from lightning_relief import TVMExportCallback``."""
