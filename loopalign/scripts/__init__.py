"""The recipes' bodies: one module per script, each with ``main(argv=None)`` (run by ``recipes/<name>.py`` and
``loopalign <command>``)."""
