"""cloudctl: the command-line client of a Cumulus control plane.

It talks to the public REST API only and imports nothing from Django or the control-plane
apps (an import-linter contract keeps it that way).
"""
