"""The `vpexport` command line.

Commands live in `vpexport/commands/<name>.py` and are imported only when invoked, so
`vpexport --help` and recipe checks stay instant (no torch import). Every VpexportError
becomes one line on stderr and its class's exit code; no traceback reaches the user.
"""

from __future__ import annotations

import importlib
import sys

import click

from vpexport.errors import VpexportError

# name -> (module, attribute, one-line help). The single table of CLI commands.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": ("vpexport.commands.build", "build", "Run the whole pipeline for a recipe (calibrate, export, engine, validate, package)."),
    "plan": ("vpexport.commands.plan", "plan", "Show a recipe's segments, static shapes, FLOPs and KV-cache bytes."),
    "run": ("vpexport.commands.run", "run", "Answer a prompt about an image (PyTorch recipe or exported artifacts)."),
    "testbed": ("vpexport.testbed.cli", "testbed", "Build, train and synthesise the testbed models and data."),
    "engine": ("vpexport.commands.engine", "engine", "Build TensorRT engines (.plan) from the exported ONNX (needs an NVIDIA GPU)."),
    "eval": ("vpexport.commands.eval", "eval_cmd", "Accuracy of a recipe's schedule on its eval split."),
    "package": ("vpexport.commands.package", "package", "Write a Triton model repository from exported artifacts."),
    "analyze": ("vpexport.commands.analyze", "analyze", "Per-layer visual-token statistics (attention flows, value contributions, causal check)."),
    "calibrate": ("vpexport.commands.calibrate", "calibrate", "Search prune layers and keep budgets: lowest FLOPs within the accuracy tolerance, or most accurate within a FLOPs budget."),
    "bench": ("vpexport.commands.bench", "bench", "Latency, memory, FLOPs and KV ratios: pruned vs unpruned artifacts."),
    "export": ("vpexport.commands.export", "export", "Export ONNX graphs (vision, prefill, decode) and runtime assets."),
    "validate": ("vpexport.commands.validate", "validate", "Compare exported artifacts with the PyTorch model; non-zero exit on any mismatch."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(mod), attr)

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vpexport")
def cli():
    """vpexport: compile a multimodal LLM (LLaVA, Qwen2-VL, Qwen2.5-VL) into static-shape, visual-token-pruned artifacts."""


def _terminate(signum, frame):
    # SIGTERM (a service manager, `kill`, a CI timeout) unwinds like Ctrl-C: every `finally` that
    # removes a temp folder or releases the artifact lock runs before the process exits.
    raise KeyboardInterrupt


def main(argv=None):
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="vpexport", standalone_mode=False)
    except VpexportError as e:
        click.echo(f"error: {e.one_line()}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        import errno

        from vpexport.artifact_lock import storage_error

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
            raise
        err = storage_error(e, getattr(e, "filename", None) or "the artifact folder")
        click.echo(f"error: {err.one_line()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
