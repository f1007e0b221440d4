"""skinvlm: facial skin photo folders to a served, evaluated Korean vision-language model."""

__version__ = "0.1.0"
