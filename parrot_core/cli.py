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
    import os
    import runpy
    import sys

    sys.argv = [program, *(args or [])]
    sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
    runpy.run_path(program, run_name="__main__")


@app.command()
def version() -> None:
    """Print the version."""
    from parrot_core import __version__

    typer.echo(__version__)


@app.command(name="export-hf")
def export_hf(
    out_dir: str = typer.Argument(..., help="The directory to write (replaced with --overwrite)."),
    model: str = typer.Option(None, help="A llama GGUF file; default: the bundled SmolLM2-135M-Instruct."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (vLLM's names)."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
) -> None:
    """Write a GGUF model as a Hugging Face safetensors directory (for vLLM or transformers)."""
    from parrot_core.engines.builtin.config import dtype_from_name
    from parrot_core.engines.builtin.default_model import default_model_path
    from parrot_core.engines.builtin.export_hf import export_hf as run_export
    from parrot_core.errors import InvalidRequestError

    try:
        typer.echo(run_export(model or default_model_path(), out_dir, dtype_from_name(dtype), overwrite=overwrite))
    except (InvalidRequestError, FileExistsError) as e:
        raise typer.BadParameter(f"{e} (add --overwrite to replace it)" if isinstance(e, FileExistsError) else str(e)) from e


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
