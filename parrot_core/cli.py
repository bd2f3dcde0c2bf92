"""The `parrot-core` command."""

from __future__ import annotations

import typer

from parrot_core.serve.settings import ServeSettings, settings_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="parrot-core: a prefix-sharing LLM serving core.")


@app.command()
def demo(model: str = typer.Option(None, help="A llama GGUF file; default: the bundled SmolLM2-135M-Instruct.")) -> None:
    """Answer questions that share one system prompt, then show what sharing saved."""
    from parrot_core.demo import run_demo

    run_demo(model)


@app.command()
def version() -> None:
    """Print the version."""
    from parrot_core import __version__

    typer.echo(__version__)


@app.command(name="serve")
@settings_command
def serve(settings: ServeSettings) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (flags follow vLLM's)."""
    from parrot_core.serve.server import serve as run_server

    run_server(settings)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
