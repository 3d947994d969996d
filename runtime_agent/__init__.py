"""The Cumulus runtime agent: registers a node, runs its Ray process, heartbeats to the control plane.

Standard library plus Ray only; it must never import Django or a control-plane app.
"""
