"""The HTTP server of parrot-core (`parrot-core serve`): the top layer.

It wires a `Runtime` to FastAPI: the OpenAI-compatible API (`openai_api`), Parrot's program
API (`program_api`), operations and metrics (`app`, `metrics`), settings shared by the CLI,
the environment and Python (`settings`), and uvicorn (`server`).
"""
