"""What users run: the command line, the client, the browser bridge, the local cluster, the export tools and the
demo. Imports any layer below."""
