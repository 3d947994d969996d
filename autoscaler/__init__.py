"""Cumulus's autoscaler (issue 3).

`autoscaler.planner` is the pure policy: plain values in (groups, nodes, Ray's pending demand,
quotas), one explained `Decision` out. It imports no Django, no models and no I/O library
(an import-linter contract holds it to that), so every rule is a row in a fast test table.
"""
