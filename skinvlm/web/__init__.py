"""skinvlm's local web pages, one package: security (what every page needs on a clinic's machine), review (the
clinicians' page) and its static files."""
