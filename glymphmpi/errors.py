"""Exceptions that map to the CLI's exit codes (docs/architecture.md, "Data contracts").

* :class:`InputError` - bad input or usage: one line naming the file and the
  problem, exit code 2, never a traceback.
* :class:`MissingDependency` - a component (DOLFINx, torch, SLURM, a GPU) is
  not installed or not present: exit code 2 with what to install.
* :class:`Preempted` - stopped by a signal after writing a checkpoint: exit 75.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a scheduler may requeue


class GlymphError(Exception):
    """Base class of the errors the CLI reports in one line."""

    exit_code = EXIT_FAILURE


class InputError(GlymphError, ValueError):
    """Bad input: the message names the file and the problem."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class MissingDependency(GlymphError, ImportError):
    """A required component is not installed."""

    exit_code = EXIT_INPUT


class Preempted(GlymphError):
    """Stopped by SIGTERM/SIGUSR1 after a checkpoint was written."""

    exit_code = EXIT_PREEMPTED


def require(module: str, what: str, extra: str | None = None):
    """Import ``module`` or raise :class:`MissingDependency` naming the fix."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the machine
        hint = f"pip install 'glymphmpi[{extra}]'" if extra else "run hpc/install.sh"
        raise MissingDependency(f"{what} needs {module!r}, which is not installed ({exc}); {hint}") from None
