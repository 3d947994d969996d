"""Clusters: specs, node groups, nodes, events; the reconciler; providers; the REST and agent APIs."""
