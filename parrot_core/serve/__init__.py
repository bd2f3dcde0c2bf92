"""The HTTP server of parrot-core (`parrot-core serve`): `app.create_app`, `server.serve`."""
