"""Slicer CLIs: one folder per CLI, ``<Name>/<Name>.py`` + ``<Name>.xml``."""
