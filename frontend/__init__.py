"""The web console: server-rendered pages with htmx for the live parts, on the same services as the API."""
