"""Bodies of the recipes: ``loopalign.scripts.<name>.main(argv)``, called by ``recipes/<name>.py`` and the CLI."""
