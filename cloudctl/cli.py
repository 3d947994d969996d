"""The `cloudctl` executable: `cloudctl sync` at once, every other command through the typer app.

Importing typer, click and rich takes about 100 ms before any command starts, more than a whole
`cloudctl sync` of a project with a file or two changed. So `main` reads the options of `sync`
itself and runs it, and hands anything else (another command, `--help`, an option it does not
know, an option given twice) to the typer app in cloudctl.main, which then does exactly what it
always did. Both run the same `cloudctl.sync.sync_command` and report failures the same way.
"""

from __future__ import annotations

import sys

_VALUED = {"-f": "file", "--file": "file", "--max-size": "max_size"}


def sync_options(args: list[str]) -> dict | None:
    """The options of `cloudctl sync ARGS` if ARGS are plainly those (each at most once); else None."""
    options: dict = {"file": None, "max_size": None, "json_out": False}
    seen: set[str] = set()
    rest = iter(args)
    for arg in rest:
        if arg == "--json":
            key, value = "json_out", True
        else:
            name, equals, value = arg.partition("=")
            key = _VALUED.get(name if equals and name.startswith("--") else arg)
            if key is None:
                return None
            if not equals:
                value = next(rest, "")
            if not value or value.startswith("-"):
                return None  # typer's to read (and to refuse, or not)
        if key in seen:
            return None
        seen.add(key)
        options[key] = value
    return options


def run_sync(file: str | None, max_size: str | None, json_out: bool) -> int:
    """`cloudctl sync`; returns the exit status. Failures as cloudctl.main's `fail_cleanly` reports them.

    The cycle collector is kept out of it: nearly all a sync makes (an entry per file, the cache's
    map) lives until it ends, so the collector would only walk over it again and again.
    """
    import gc

    from cloudctl.errors import INTERRUPTED, CloudctlError

    collecting = gc.isenabled()
    gc.disable()
    try:
        from cloudctl.walk import start_walk

        started = start_walk(file)  # the walk runs in a child while the rest of cloudctl.sync is imported
        from cloudctl.sync import sync_command

        sync_command(file, max_size, json_out, started=started)
    except CloudctlError as exc:
        from cloudctl import output

        for line in exc.lines():
            output.err.print(line, markup=False, soft_wrap=True)
        return exc.code
    except KeyboardInterrupt:
        from cloudctl import output

        output.err.print(INTERRUPTED, markup=False, soft_wrap=True)
        return 130
    finally:
        if collecting:
            gc.enable()
    return 0


def main() -> None:
    args = sys.argv[1:]
    options = sync_options(args[1:]) if args[:1] == ["sync"] else None
    if options is None:
        from cloudctl.main import app

        app()
        return
    code = run_sync(**options)
    end(code)


def end(code: int) -> None:
    """Leave the process with `code` once the output is flushed, without tearing down what the sync built.

    Nothing is left to run or to close: every file the sync wrote is closed and its thread pools
    are shut down. Freeing its objects one by one (an entry per file, the cache's map) would cost
    an incremental sync of 10,000 files a few milliseconds more, for nothing.
    """
    import os

    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - contextlib is not imported on the way to a sync
            stream.flush()
        except OSError:  # a reader that went away (`| head`): nothing more can reach it
            pass
    os._exit(code)

if __name__ == "__main__":
    main()
