"""The `parrot-core` command."""

from __future__ import annotations

import typer

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
