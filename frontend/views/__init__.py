"""The console's pages, one module per noun; each view is thin and calls the same services as the API."""
