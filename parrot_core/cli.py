"""The `parrot-core` command."""

from __future__ import annotations

import typer

from parrot_core.server.settings import ServeSettings, settings_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="parrot-core: a prefix-sharing LLM serving core.")


@app.command()
def demo(model: str = typer.Option(None, help="A llama GGUF file; default: the bundled SmolLM2-135M-Instruct.")) -> None:
    """Answer questions that share one system prompt, then show what sharing saved."""
    from parrot_core.demo import run_demo

    run_demo(model)


@app.command()
def run(program: str = typer.Argument(..., help="A Python file, e.g. examples/map_reduce.py."), args: list[str] = typer.Argument(None)) -> None:
    """Run a parrot-core program (a Python file using semantic functions) as `__main__`."""
    import runpy
    import sys

    sys.argv = [program, *(args or [])]
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(program)))
    runpy.run_path(program, run_name="__main__")


@app.command()
def version() -> None:
    """Print the version."""
    from parrot_core import __version__

    typer.echo(__version__)


@app.command(name="serve")
@settings_command
def serve(settings: ServeSettings) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (flags follow vLLM's)."""
    from parrot_core.server.server import serve as run_server

    run_server(settings)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
